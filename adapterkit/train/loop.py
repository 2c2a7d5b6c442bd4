"""`train(cfg)`: make one task adapter with the InstructPix2Pix objective, on accelerate (CPU, one GPU, many processes).

The loop in `train` is the whole recipe: setup, then per step (loss, optimizer step, log, validate, checkpoint),
then save; below it, the step itself (batch, loss, optimizer step). Helpers with one job each live beside it:
setup.py (accelerator, trainable adapter, optimizer), batches.py (transforms, encoders, latent cache), validation.py,
checkpoints.py (save / list / prune / resume / publish, signals, teardown), preservation.py (--kv-preservation).

Objective (Brooks et al. 2211.09800, as diffusers' train_instruct_pix2pix.py): z = s * VAE(target) sampled from the
posterior, c_I = VAE(input) posterior mode (no scaling, as the pipeline), c_T = text features of the instruction;
noise eps, timestep t uniform over the base's schedule; loss = || eps - UNet([z_t, c_I], t, c_T) ||^2 (or the v target
when the base predicts v). Conditioning dropout draws one uniform r per example: c_T -> features of "" when r < 2p,
c_I -> 0 when p <= r < 3p, so text only, both, and image only are each dropped with probability p.

Determinism: every random draw of step s, micro-step m, process k comes from a generator seeded by hash(seed, s, m, k),
the data order of epoch e from hash(seed, e): a resumed run needs only the step, the adapter and accelerate's state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import get_method
from ..adapters.record import Adapter, load_adapter
from ..base import load_base, read_base_info
from ..data import EditDataset, load_edit_dataset, read_instructions_file
from ..errors import AdapterkitError
from ..faults import fault_point
from . import checkpoints
from .batches import BatchStream, LatentCache, encode_text, seeded_generator
from .checkpoints import CHECKPOINTS, LOG_FILE, LOGS, StopSignal, TrainingInterrupted  # noqa: F401 (re-exported for the CLI)
from ..fileio import BASE_INFO_FILE
from .config import TrainConfig, describe_recommended
from .preservation import make_preservation
from .setup import (
    check_resolution, describe_rows, hold_out, init_trackers, make_accelerator, make_adapter_trainable, make_optimizer,
    row_counts,
)

FINAL_LOSS_WINDOW = 10  # final_loss / initial_loss: mean over the last / first this many steps


@dataclass
class TrainerState:
    """What a checkpoint adds to accelerate's state: how far we are and the loss so far."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step so far
    skipped: dict = field(default_factory=dict)  # dataset row -> reason, rows with unreadable images
    last_checkpoint: str | None = None


@dataclass
class _Run:
    """Everything `train` set up; the helpers below read it."""

    cfg: TrainConfig
    accelerator: object
    base: object
    unet: object  # prepared (DDP-wrapped when multi-process)
    optimizer: object
    lr_scheduler: object
    params: list
    noise_scheduler: object
    dataset: EditDataset
    train_indices: list[int]
    validation_indices: list[int]
    synonyms: list[str]
    resolution: int
    null_text: torch.Tensor  # (1, 77, d): features of "", the dropped text condition
    options: dict | None  # the method's options (adapters/<method>.training_options)
    recommended_by_base: dict = field(default_factory=dict)  # settings the base's adapterkit_base.json filled in
    stream: BatchStream | None = None  # made once the latent cache (if any) is built
    preservation: object = None  # the --kv-preservation term (preservation.py), set up with the run

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


# ==================================================================================================== the recipe
def train(cfg: TrainConfig) -> Adapter:
    """Train one adapter as `cfg` says and write it to `cfg.output`; returns the saved Adapter.

    Settings left at None take the base's recommendation (adapterkit_base.json), else the plain defaults
    (TrainConfig.resolved); the line printed and adapter.json's training.recommended_by_base say which."""
    cfg, from_base = cfg.resolved(read_base_info(cfg.base), f"{cfg.base}'s {BASE_INFO_FILE}")
    accelerator = make_accelerator(cfg)
    if from_base and not cfg.quiet:  # adapter.json keeps them (training.recommended_by_base) either way
        accelerator.print(describe_recommended(from_base, cfg.base))
    run = _setup(cfg, accelerator)
    run.recommended_by_base = from_base
    state = _resume(run) if cfg.resume else TrainerState()
    if accelerator.is_main_process:  # the log reads like one run: rows after the starting step are dropped
        checkpoints.truncate_log(os.path.join(cfg.output, LOGS, LOG_FILE), state.step)
    init_trackers(accelerator, cfg.to_dict())  # only once setup passed: a refused run writes nothing under OUTPUT
    stop = StopSignal()
    bar = tqdm(total=cfg.steps, initial=state.step, desc=f"train {cfg.task}", unit="step", disable=cfg.quiet or not accelerator.is_main_process)
    images_per_step = cfg.batch_size * cfg.gradient_accumulation * run.world
    try:
        for step in range(state.step, cfg.steps):
            started = time.perf_counter()
            loss, skipped, stop_requested = _train_step(run, step, stop)
            done = step + 1
            if not math.isfinite(loss):
                raise _non_finite(loss, done, state)
            state.step, state.losses = done, state.losses + [loss]
            state.skipped.update(run.dataset.skipped)
            _check_skipped(run, skipped)
            lr = run.lr_scheduler.get_last_lr()[0]
            _log(run, done, loss, lr, images_per_step / (time.perf_counter() - started), bar)
            if cfg.validation_steps and done % cfg.validation_steps == 0:
                _validate(run, done)
            if cfg.checkpoint_steps and done % cfg.checkpoint_steps == 0:
                state.last_checkpoint = _save_checkpoint(run, state)
            if stop_requested:
                if state.last_checkpoint != checkpoints.checkpoint_path(cfg.output, done):
                    state.last_checkpoint = _save_checkpoint(run, state)
                raise TrainingInterrupted(
                    f"stopped at step {done}; checkpoint saved to {state.last_checkpoint}; continue with --resume latest"
                )
        if cfg.validation_steps and state.step % cfg.validation_steps != 0:
            _validate(run, state.step)
        adapter = _finish(run, state)
        if run.world > 1:  # the DDP wrapper must go before the process group does (checkpoints.release_process_group)
            run.unet = run.optimizer = None
            checkpoints.release_process_group(accelerator)
        return adapter
    finally:
        stop.restore()
        bar.close()
        accelerator.end_training()


# ==================================================================================================== setup
def _setup(cfg: TrainConfig, accelerator) -> _Run:
    """Data first (cheap, catches column mistakes), then the base, the trainable adapter, optimizer and schedule."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    if accelerator.is_main_process:
        checkpoints.clean_stale_temporaries(cfg.output)
    checkpoints.check_output_folder(cfg.output, cfg.resume, (cfg.task, cfg.method), cfg.overwrite)
    synonyms = list(dict.fromkeys(list(cfg.instructions) + (read_instructions_file(cfg.instructions_file) if cfg.instructions_file else [])))
    dataset = load_edit_dataset(
        cfg.data, preset=cfg.preset, input_column=cfg.input_column, target_column=cfg.target_column,
        instruction_column=cfg.instruction_column, split=cfg.split, task=cfg.data_task, limit=cfg.limit,
        require_instruction=not synonyms,
    )
    if dataset.dropped:
        accelerator.print(f"{len(dataset.dropped)} rows of {cfg.data} have an empty instruction and are left out")
    validation_indices, train_indices = hold_out(len(dataset), cfg)
    if not cfg.quiet:
        accelerator.print(describe_rows(cfg, dataset.split, row_counts(dataset, validation_indices, train_indices, 0)))
    base = load_base(cfg.base)
    resolution = cfg.resolution or base.resolution
    check_resolution(base, resolution)
    params, options = make_adapter_trainable(cfg, base, accelerator)
    optimizer = make_optimizer(params, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(base.unet, optimizer, lr_scheduler)
    # Checkpoints hold the adapter (written by checkpoints.save_checkpoint), not the frozen 3 GB base: keep accelerate's
    # save_state/load_state away from the UNet weights and let it handle optimizer, scheduler, scaler and RNGs.
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    pipe = base.pipe
    run = _Run(
        cfg=cfg, accelerator=accelerator, base=base, unet=unet, optimizer=optimizer, lr_scheduler=lr_scheduler,
        params=params, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), dataset=dataset,
        train_indices=train_indices, validation_indices=validation_indices, synonyms=synonyms, resolution=resolution,
        null_text=encode_text(pipe.tokenizer, pipe.text_encoder, [""]), options=options,
    )
    run.preservation = make_preservation(cfg, base, get_method(cfg.method), options, synonyms or _distinct(  # copies the
        [dataset.instructions[i] for i in train_indices]), accelerator.device)  # base K/V: before a resume loads weights
    cache = None
    if cfg.cache_latents:
        cache = LatentCache.build(
            dataset, train_indices, pipe.vae, pipe.tokenizer, pipe.text_encoder, synonyms, resolution,
            cfg.random_flip, quiet=cfg.quiet or not accelerator.is_main_process,
        )
        _check_skipped(run, len(dataset.skipped))
    run.stream = BatchStream(
        dataset, train_indices, pipe, synonyms, resolution, cfg.batch_size, cfg.gradient_accumulation,
        run.world, run.rank, cfg.seed, cfg.center_crop, cfg.random_flip, accelerator.device, cache,
    )
    return run


# ==================================================================================================== one step
def _train_step(run: _Run, step: int, stop: StopSignal) -> tuple[float, int, bool]:
    """Gradient accumulation over micro-batches, then one optimizer step unless the loss is not finite.

    Returns (loss averaged over micro-batches and processes, most unreadable rows any process has seen, whether
    any process was asked to stop): one gather per step so every process takes the same decisions.
    """
    cfg, accelerator = run.cfg, run.accelerator
    losses = []
    for micro in range(cfg.gradient_accumulation):
        generator = seeded_generator(cfg.seed, "step", step, micro, run.rank)
        latents, cond, text = run.stream.batch(step, micro, generator)
        last = micro == cfg.gradient_accumulation - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.unet):
            loss = ip2p_loss(run.unet, run.noise_scheduler, latents, cond, text, run.null_text, generator, cfg.conditioning_dropout)
            loss = loss + run.preservation.loss(accelerator.unwrap_model(run.unet))  # 0 without --kv-preservation
            accelerator.backward(loss / cfg.gradient_accumulation)
        losses.append(loss.detach().float())
    local = torch.stack([torch.stack(losses).mean(), torch.tensor(float(len(run.dataset.skipped))).to(losses[0]), torch.tensor(float(stop.requested)).to(losses[0])])
    stats = accelerator.gather(local[None]).reshape(-1, 3)  # (processes, 3)
    loss = float(stats[:, 0].mean())
    fault_point("train.step")  # tests: SIGKILL with gradients computed, weights not yet updated
    if math.isfinite(loss):
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss, int(stats[:, 1].max()), bool(stats[:, 2].max())


def ip2p_loss(unet, noise_scheduler, latents, cond_latents, text, null_text, generator: torch.Generator, dropout: float):
    """The IP2P training loss for one batch (see the module docstring); draws noise, t and r from `generator`.

    latents (B, 4, h, w): scaled target latents; cond_latents (B, 4, h, w): unscaled input latents (mode);
    text (B, 77, d); null_text (1, 77, d).
    """
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (b,), generator=generator).to(device)
    r = torch.rand(b, generator=generator).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    text, cond_latents = conditioning_dropout(text, null_text, cond_latents, r, dropout)
    model_input = torch.cat([noisy, cond_latents], dim=1)  # (B, 8, h, w): noisy target | image condition
    prediction = unet(model_input, timesteps, encoder_hidden_states=text).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


def prediction_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet learns to predict under the scheduler's `prediction_type`: the noise, or v (Salimans & Ho)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise AdapterkitError(f"the base's scheduler predicts '{kind}'; adapterkit trains epsilon or v_prediction bases")


def conditioning_dropout(text, null_text, image_latents, r, p: float):
    """IP2P's dropout with one uniform r per example: text -> "" if r < 2p; image -> 0 if p <= r < 3p.

    So r in [0, p) drops text only, [p, 2p) both, [2p, 3p) image only: each case has probability p.
    text (B, 77, d), null_text (1, 77, d), image_latents (B, 4, h, w), r (B,).
    """
    drop_text = (r < 2 * p)[:, None, None]  # (B, 1, 1)
    keep_image = ~((r >= p) & (r < 3 * p))  # (B,)
    text = torch.where(drop_text, null_text.to(text.dtype).expand_as(text), text)
    return text, image_latents * keep_image[:, None, None, None].to(image_latents.dtype)


# ==================================================================================================== checks, logs
def _non_finite(loss: float, step: int, state: TrainerState) -> AdapterkitError:
    keep = f"the last good checkpoint is {state.last_checkpoint}" if state.last_checkpoint else "no checkpoint was saved yet"
    return AdapterkitError(
        f"training stopped: the loss became {loss} at step {step} (weights not updated); {keep}; lower "
        "--learning-rate, or try --optimizer adamw or --mixed-precision bf16/no, then --resume that checkpoint"
    )


def _check_skipped(run: _Run, skipped: int) -> None:
    n = len(run.dataset)
    if skipped > run.cfg.max_skipped_fraction * n:
        example = next(iter(run.dataset.skipped.items()), None)
        detail = f"; e.g. row {example[0]}: {example[1]}" if example else ""
        raise AdapterkitError(
            f"{skipped} of {n} rows have unreadable images, more than --max-skipped-fraction "
            f"{run.cfg.max_skipped_fraction}{detail}; fix or remove those files"
        )


def _log(run: _Run, step: int, loss: float, lr: float, images_per_second: float, bar) -> None:
    run.accelerator.log({"loss": loss, "lr": lr, "images_per_second": images_per_second}, step=step)
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}", refresh=False)
    bar.update(1)
    if run.accelerator.is_main_process:
        checkpoints.append_log(run.cfg.output, {"step": step, "loss": loss, "lr": lr, "images_per_second": round(images_per_second, 3)})


def _validate(run: _Run, step: int) -> str | None:
    """The held-out rows edited with the current adapter (validation.py), on the main process."""
    from .validation import validate

    if not run.accelerator.is_main_process or not run.validation_indices:
        return None
    examples = [ex for i in run.validation_indices if (ex := run.dataset.get(i)) is not None]
    return validate(run.accelerator, run.unet, run.base.pipe, examples, run.synonyms, run.resolution,
                    run.cfg.validation_inference_steps, run.cfg.seed, run.cfg.output, step)


# ==================================================================================================== checkpoints, output
def _save_checkpoint(run: _Run, state: TrainerState) -> str:
    """Save a resumable checkpoint of this run (checkpoints.save_checkpoint); returns its folder."""
    trainer_state = {**dataclasses.asdict(state), "config": run.cfg.to_dict(), "num_processes": run.world}
    return checkpoints.save_checkpoint(run.accelerator, run.cfg.output, state.step, lambda: _current_adapter(run, state),
                                       trainer_state, run.cfg.checkpoints_total_limit)


def _resume(run: _Run) -> TrainerState:
    """Load a checkpoint: adapter weights into the UNet, accelerate state, step and loss history."""
    cfg, accelerator = run.cfg, run.accelerator
    path = checkpoints.resolve_resume(cfg.output, cfg.resume)
    if path is None:
        accelerator.print(f"no checkpoint in {os.path.join(cfg.output, CHECKPOINTS)}; starting a new run")
        return TrainerState()
    saved = checkpoints.read_checkpoint(path, cfg.to_dict(), accelerator.print)
    tensors = load_adapter(os.path.join(path, "adapter")).tensors
    get_method(cfg.method).load_trainable(accelerator.unwrap_model(run.unet), tensors)
    accelerator.load_state(path)
    run.dataset.skipped.update({int(k): v for k, v in saved.get("skipped", {}).items()})
    return TrainerState(step=saved["step"], losses=list(saved["losses"]), skipped=dict(run.dataset.skipped), last_checkpoint=path)


def _current_adapter(run: _Run, state: TrainerState) -> Adapter:
    cfg = run.cfg
    unet = run.accelerator.unwrap_model(run.unet)
    tensors = get_method(cfg.method).extract(unet)
    losses = state.losses
    training = {
        **cfg.to_dict(),
        "resolution": run.resolution,
        "steps_done": state.step,
        "final_loss": _mean(losses[-FINAL_LOSS_WINDOW:]),
        "initial_loss": _mean(losses[:FINAL_LOSS_WINDOW]),
        "num_processes": run.world,
        "global_batch_size": cfg.batch_size * cfg.gradient_accumulation * run.world,
        "training_rows": len(run.train_indices),
        "skipped_rows": len(state.skipped),
        "rows_without_instruction": len(run.dataset.dropped),
        "rows": row_counts(run.dataset, run.validation_indices, run.train_indices, len(state.skipped)),
        "recommended_by_base": dict(run.recommended_by_base),
    }
    return Adapter(
        method=cfg.method,
        task=cfg.task,
        instructions=run.synonyms or _distinct([run.dataset.instructions[i] for i in run.train_indices]),
        tensors=tensors,
        base={"name_or_path": run.base.name_or_path, "fingerprint": run.base.fingerprint},
        options=run.options,
        training=training,
        metrics={"final_loss": training["final_loss"]},
    )


def _finish(run: _Run, state: TrainerState) -> Adapter:
    """Check the processes agree, then write the adapter folder (main process) and return it."""
    accelerator = run.accelerator
    adapter = _current_adapter(run, state)
    checksum = _checksum(adapter.tensors)
    if run.world > 1:
        from accelerate.utils import gather_object

        checksums = gather_object([checksum])
    else:
        checksums = [checksum]
    adapter.training["replica_checksums"] = checksums
    if len(set(checksums)) > 1:
        accelerator.print(f"warning: the {run.world} processes ended with different adapter weights: {checksums}")
    if accelerator.is_main_process:
        checkpoints.publish(adapter, run.cfg.output)
    accelerator.wait_for_everyone()
    adapter.path = run.cfg.output
    return adapter


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _distinct(texts: list[str]) -> list[str]:
    return [t for t in dict.fromkeys(texts) if t]
