"""`train(cfg)`: make one task adapter with the InstructPix2Pix objective, on accelerate (CPU, one GPU, many processes).

The loop in `train` is the whole recipe: setup, then per step (loss, optimizer step, log, validate, checkpoint),
then save. Everything else in this file is a helper it calls.

Objective (Brooks et al. 2211.09800, as diffusers' train_instruct_pix2pix.py): z = s * VAE(target) sampled from the
posterior, c_I = VAE(input) posterior mode (no scaling, as the pipeline), c_T = text features of the instruction;
noise eps, timestep t uniform over the base's schedule; loss = || eps - UNet([z_t, c_I], t, c_T) ||^2 (or the
v target when the base predicts v). Conditioning dropout draws one uniform r per example: c_T -> features of ""
when r < 2p, c_I -> 0 when p <= r < 3p, so text only, both, and image only are each dropped with probability p.

Determinism: every random draw of step s, micro-step m, process k comes from a generator seeded by hash(seed, s, m,
k), and the data order of epoch e from hash(seed, e). A resumed run therefore needs only the step, the adapter
weights and the optimizer/scheduler state (accelerate's save_state) to continue bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..adapters import Adapter, custom_diffusion, load_adapter, lora, save_adapter
from ..base import load_base
from ..errors import AdapterkitError
from ..faults import fault_point
from ..fileio import atomic_file, atomic_folder, clean_stale, discard_folder, write_json
from .config import TrainConfig
from .data import (
    EditDataset,
    LatentCache,
    encode_images,
    encode_text,
    load_edit_dataset,
    paired_transform,
    read_instructions_file,
    sample_instruction,
)

CHECKPOINTS = "checkpoints"
VALIDATION = "validation"
LOGS = "logs"
STATE_FILE = "trainer_state.json"
FINAL_LOSS_WINDOW = 10  # final_loss / initial_loss: mean over the last / first this many steps


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during training: a checkpoint was saved first; the message says where."""


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
    lora_config: dict | None
    cache: LatentCache | None = None
    _perm: tuple[int, torch.Tensor] | None = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index


# ==================================================================================================== the recipe
def train(cfg: TrainConfig) -> Adapter:
    """Train one adapter as `cfg` says and write it to `cfg.output`; returns the saved Adapter."""
    accelerator = _make_accelerator(cfg)
    run = _setup(cfg, accelerator)
    state = _resume(run) if cfg.resume else TrainerState()
    if accelerator.is_main_process:  # the log reads like one run: rows after the starting step are dropped
        _truncate_log(os.path.join(cfg.output, LOGS, "train_log.jsonl"), state.step)
    _init_trackers(run)
    stop = _StopSignal()
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
                if state.last_checkpoint != _checkpoint_path(cfg, done):
                    state.last_checkpoint = _save_checkpoint(run, state)
                raise TrainingInterrupted(
                    f"stopped at step {done}; checkpoint saved to {state.last_checkpoint}; continue with --resume latest"
                )
        if cfg.validation_steps and state.step % cfg.validation_steps != 0:
            _validate(run, state.step)
        adapter = _finish(run, state)
        _release_process_group(run)
        return adapter
    finally:
        stop.restore()
        bar.close()
        accelerator.end_training()


# ==================================================================================================== setup
def _make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    _reset_accelerate_state()
    log_with = cfg.log_with
    if log_with == "auto":
        log_with = "tensorboard" if is_tensorboard_available() else "none"
    if log_with == "tensorboard" and not is_tensorboard_available():
        raise AdapterkitError("--log-with tensorboard needs the tensorboard package (pip install tensorboard), or use --log-with none")
    # accelerate sets up CPU multi-process (gloo) only when told cpu=True: under torchrun without a GPU, tell it.
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=cfg.cpu or (launched and not torch.cuda.is_available()),
        log_with=None if log_with == "none" else log_with,
        project_config=ProjectConfiguration(project_dir=cfg.output, logging_dir=os.path.join(cfg.output, LOGS)),
        # We step the LR scheduler once per optimizer step ourselves; accelerate would step it once per process.
        step_scheduler_with_optimizer=False,
    )
    if cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise AdapterkitError("--mixed-precision fp16 needs a GPU; on CPU use bf16 or no")
    return accelerator


def _init_trackers(run: _Run) -> None:
    """Called once setup passed, so that a run refused for bad data or a bad base writes nothing under OUTPUT."""
    if run.accelerator.log_with:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in run.cfg.to_dict().items()}
        run.accelerator.init_trackers("adapterkit", config=config)


def _reset_accelerate_state() -> None:
    """accelerate keeps one global state per process; a second train() (notebook, tests) may want another precision.

    Inside a launched multi-process run the process group stays: only the per-run part is cleared.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not (dist.is_available() and dist.is_initialized()))
    GradientState._reset_state()


def _setup(cfg: TrainConfig, accelerator) -> _Run:
    """Data first (cheap, catches column mistakes), then the base, the trainable adapter, optimizer and schedule."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    if accelerator.is_main_process:
        _clean_stale_temporaries(cfg.output)
    _check_output_folder(cfg)
    synonyms = list(dict.fromkeys(list(cfg.instructions) + (read_instructions_file(cfg.instructions_file) if cfg.instructions_file else [])))
    dataset = load_edit_dataset(
        cfg.data, preset=cfg.preset, input_column=cfg.input_column, target_column=cfg.target_column,
        instruction_column=cfg.instruction_column, split=cfg.split, task=cfg.data_task, limit=cfg.limit,
        require_instruction=not synonyms,
    )
    if dataset.dropped:
        accelerator.print(f"{len(dataset.dropped)} rows of {cfg.data} have an empty instruction and are left out")
    validation_indices, train_indices = _hold_out(len(dataset), cfg)
    base = load_base(cfg.base)
    resolution = cfg.resolution or base.resolution
    _check_resolution(base, resolution)
    params, lora_config = _make_adapter_trainable(cfg, base, accelerator)
    optimizer = make_optimizer(params, cfg.optimizer, cfg.learning_rate, cfg.weight_decay)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(base.unet, optimizer, lr_scheduler)
    # Checkpoints hold the adapter (written by _save_checkpoint), not the frozen 3 GB base: keep accelerate's
    # save_state/load_state away from the UNet weights and let it handle optimizer, scheduler, scaler and RNGs.
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
    pipe = base.pipe
    run = _Run(
        cfg=cfg, accelerator=accelerator, base=base, unet=unet, optimizer=optimizer, lr_scheduler=lr_scheduler,
        params=params, noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config), dataset=dataset,
        train_indices=train_indices, validation_indices=validation_indices, synonyms=synonyms, resolution=resolution,
        null_text=encode_text(pipe.tokenizer, pipe.text_encoder, [""]), lora_config=lora_config,
    )
    if cfg.cache_latents:
        run.cache = LatentCache.build(
            dataset, train_indices, pipe.vae, pipe.tokenizer, pipe.text_encoder, synonyms, resolution,
            cfg.random_flip, quiet=cfg.quiet or not accelerator.is_main_process,
        )
        _check_skipped(run, len(dataset.skipped))
    return run


def _clean_stale_temporaries(output: str) -> None:
    """Delete what a killed run left half written: temporary copies of OUTPUT and of its checkpoints, logs, images."""
    clean_stale(os.path.dirname(os.path.abspath(output)), os.path.basename(os.path.abspath(output)))
    for sub in ("", CHECKPOINTS, VALIDATION, LOGS):
        clean_stale(os.path.join(output, sub))


def _check_output_folder(cfg: TrainConfig) -> None:
    checkpoints = os.path.join(cfg.output, CHECKPOINTS)
    if not cfg.resume and _list_checkpoints(checkpoints):
        raise AdapterkitError(
            f"{cfg.output} already holds checkpoints of a run; pass --resume latest to continue it, or choose another --output"
        )


def _hold_out(n: int, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(validation rows, training rows): a seeded random choice of `validation_rows` rows is never trained on."""
    if not cfg.validation_steps:
        return [], list(range(n))
    if n <= cfg.validation_rows:
        raise AdapterkitError(
            f"the dataset has {n} rows, too few to hold out {cfg.validation_rows} for validation; lower "
            "--validation-rows or pass --validation-steps 0"
        )
    chosen = sorted(torch.randperm(n, generator=_generator(cfg.seed, "validation")).tolist()[: cfg.validation_rows])
    return chosen, [i for i in range(n) if i not in set(chosen)]


def _check_resolution(base, resolution: int) -> None:
    # The UNet halves the latent once per down block but the last: latents must divide by 2^(blocks - 1).
    multiple = base.pipe.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise AdapterkitError(f"--resolution {resolution} must be a multiple of {multiple} for this base")


def _make_adapter_trainable(cfg: TrainConfig, base, accelerator) -> tuple[list[torch.nn.Parameter], dict | None]:
    """Freeze everything, attach the adapter, check that nothing else trains, set devices and dtypes."""
    from accelerate.utils import set_seed

    unet, vae, text_encoder = base.pipe.unet, base.pipe.vae, base.pipe.text_encoder
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    set_seed(cfg.seed)  # peft's gaussian LoRA init draws from the global RNG: same init on every process and run
    if cfg.method == lora.METHOD:
        lora_config = lora.make_config(cfg.rank, cfg.lora_alpha, cfg.targets)
        params = lora.make_trainable(unet, lora_config)
    else:
        lora_config, params = None, custom_diffusion.make_trainable(unet)
    _assert_only_adapter_trains(cfg.method, base, params)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    weight_dtype = torch.float32
    if accelerator.device.type != "cpu" and cfg.mixed_precision != "no":
        # Frozen weights in half precision halve their memory; trainable ones stay fp32 for the optimizer.
        weight_dtype = torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(weight_dtype)
    vae.to(accelerator.device, weight_dtype)
    text_encoder.to(accelerator.device, weight_dtype)
    return params, lora_config


def _assert_only_adapter_trains(method: str, base, params: list[torch.nn.Parameter]) -> None:
    """A bug guard: every trainable parameter is an adapter parameter, and the VAE and text encoder are frozen."""
    ours = {id(p) for p in params}
    wanted = (".lora_",) if method == lora.METHOD else ("attn2.to_k.weight", "attn2.to_v.weight")
    for name, p in base.pipe.unet.named_parameters():
        is_adapter = any(w in name for w in wanted) if method == lora.METHOD else name.endswith(wanted)
        if p.requires_grad != (id(p) in ours) or (p.requires_grad and not is_adapter):
            raise RuntimeError(f"UNet parameter {name} has requires_grad={p.requires_grad}; only {method} parameters may train")
    for part in (base.pipe.vae, base.pipe.text_encoder):
        if any(p.requires_grad for p in part.parameters()):
            raise RuntimeError(f"{type(part).__name__} has trainable parameters; it must stay frozen")


def make_optimizer(params, name: str, learning_rate: float, weight_decay: float = 0.0):
    """AdamW with 8-bit states (bitsandbytes; works on CPU too) or torch's AdamW with fp32 states."""
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise AdapterkitError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes); or pass --optimizer adamw") from e
        return bnb.optim.AdamW8bit(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    raise AdapterkitError(f"unknown optimizer '{name}'; use adamw8bit or adamw")


# ==================================================================================================== one step
def _train_step(run: _Run, step: int, stop: _StopSignal) -> tuple[float, int, bool]:
    """Gradient accumulation over micro-batches, then one optimizer step unless the loss is not finite.

    Returns (loss averaged over micro-batches and processes, most unreadable rows any process has seen, whether
    any process was asked to stop): one gather per step so every process takes the same decisions.
    """
    cfg, accelerator = run.cfg, run.accelerator
    losses = []
    for micro in range(cfg.gradient_accumulation):
        generator = _generator(cfg.seed, "step", step, micro, run.rank)
        latents, cond, text = _make_batch(run, step, micro, generator)
        last = micro == cfg.gradient_accumulation - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.unet):
            loss = ip2p_loss(run.unet, run.noise_scheduler, latents, cond, text, run.null_text, generator, cfg.conditioning_dropout)
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
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise AdapterkitError(f"the base's scheduler predicts '{kind}'; adapterkit trains epsilon or v_prediction bases")
    return F.mse_loss(prediction.float(), target.float())


def conditioning_dropout(text, null_text, image_latents, r, p: float):
    """IP2P's dropout with one uniform r per example: text -> "" if r < 2p; image -> 0 if p <= r < 3p.

    So r in [0, p) drops text only, [p, 2p) both, [2p, 3p) image only: each case has probability p.
    text (B, 77, d), null_text (1, 77, d), image_latents (B, 4, h, w), r (B,).
    """
    drop_text = (r < 2 * p)[:, None, None]  # (B, 1, 1)
    keep_image = ~((r >= p) & (r < 3 * p))  # (B,)
    text = torch.where(drop_text, null_text.to(text.dtype).expand_as(text), text)
    return text, image_latents * keep_image[:, None, None, None].to(image_latents.dtype)


def _make_batch(run: _Run, step: int, micro: int, generator: torch.Generator):
    """(scaled target latents, condition latents, text features) for this process's share of the micro-step."""
    cfg, device = run.cfg, run.accelerator.device
    vae = run.base.pipe.vae
    # Global sample positions of this process's batch: steps, micro-steps and processes tile one long stream.
    first = ((step * cfg.gradient_accumulation + micro) * run.world + run.rank) * cfg.batch_size
    rows = [_readable_row(run, position) for position in range(first, first + cfg.batch_size)]
    if run.cache is not None:
        return _batch_from_cache(run, rows, generator)
    inputs, targets, texts = [], [], []
    for row, example in rows:
        source, target = paired_transform(example, run.resolution, generator, cfg.center_crop, cfg.random_flip)
        inputs.append(source)
        targets.append(target)
        texts.append(sample_instruction(example.instruction, run.synonyms, generator))
    b = len(rows)
    mode, mean, std = encode_images(vae, torch.stack(inputs + targets))  # each (2B, 4, h, w)
    # Target: a fresh posterior sample per step, as diffusers' script (`latent_dist.sample()`), times the VAE's scale.
    eps = torch.randn(mean[b:].shape, generator=generator).to(mean.device)
    latents = (mean[b:] + std[b:] * eps) * vae.config.scaling_factor
    text = encode_text(run.base.pipe.tokenizer, run.base.pipe.text_encoder, texts)
    return latents.to(device), mode[:b].to(device), text.to(device)


def _batch_from_cache(run: _Run, rows, generator: torch.Generator):
    cache, device = run.cache, run.accelerator.device
    positions, flips, texts = [], [], []
    for row, instruction in rows:
        texts.append(sample_instruction(instruction, run.synonyms, generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5) and cache.cond.shape[1] == 2
        positions.append(cache.rows[row])
        flips.append(int(flip))
    index = (torch.tensor(positions), torch.tensor(flips))
    mean, std = cache.mean[index], cache.std[index]  # (B, 4, h, w)
    eps = torch.randn(mean.shape, generator=generator)
    latents = (mean + std * eps) * run.base.pipe.vae.config.scaling_factor
    text = torch.stack([cache.text[t] for t in texts])  # (B, 77, d)
    return latents.to(device), cache.cond[index].to(device), text.to(device)


def _readable_row(run: _Run, position: int):
    """(dataset index, example) at a stream position; an unreadable row is replaced by the next readable one.

    Epoch e visits the training rows in the order of a permutation seeded by (seed, e). With the latent cache
    the example is only its instruction (the images were encoded already).
    """
    n = len(run.train_indices)
    epoch, offset = divmod(position, n)
    if run._perm is None or run._perm[0] != epoch:
        run._perm = (epoch, torch.randperm(n, generator=_generator(run.cfg.seed, "epoch", epoch)))
    perm = run._perm[1]
    for k in range(n):
        index = run.train_indices[int(perm[(offset + k) % n])]
        if run.cache is not None:
            if index in run.cache.rows:
                return index, run.dataset.instructions[index]
            continue
        example = run.dataset.get(index)
        if example is not None:
            return index, example
    raise AdapterkitError(f"no training row of {run.dataset.source} has readable images ({len(run.dataset.skipped)} skipped)")


def _generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, keys): independent streams, no state to checkpoint."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


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
        path = os.path.join(run.cfg.output, LOGS, "train_log.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "loss": loss, "lr": lr, "images_per_second": round(images_per_second, 3)}) + "\n")


# ==================================================================================================== validation
def _validate(run: _Run, step: int) -> str | None:
    """Edit the held-out inputs with the current adapter; save OUTPUT/validation/step-N.png rows of input|target|output."""
    from PIL import Image

    from ..inference import run_pipeline

    accelerator, cfg = run.accelerator, run.cfg
    if not accelerator.is_main_process or not run.validation_indices:
        return None
    examples = [ex for i in run.validation_indices if (ex := run.dataset.get(i)) is not None]
    if not examples:
        return None
    unet = accelerator.unwrap_model(run.unet)
    unet.eval()
    size = run.resolution
    grid = Image.new("RGB", (3 * size, len(examples) * size), "white")
    try:
        with accelerator.autocast():
            for k, example in enumerate(examples):
                square = [_center_square(img, size) for img in (example.input, example.target)]
                instruction = run.synonyms[0] if run.synonyms else example.instruction
                output = run_pipeline(run.base.pipe, square[0], instruction, steps=cfg.validation_inference_steps, seed=cfg.seed)
                for column, img in enumerate(square + [output.resize((size, size))]):
                    grid.paste(img, (column * size, k * size))
    finally:
        unet.train()
    path = os.path.join(cfg.output, VALIDATION, f"step-{step}.png")
    with atomic_file(path) as f:
        grid.save(f, format="PNG")
    return path


def _center_square(img, size: int):
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


# ==================================================================================================== checkpoints
def _checkpoint_path(cfg: TrainConfig, step: int) -> str:
    return os.path.join(cfg.output, CHECKPOINTS, f"checkpoint-{step}")


def _list_checkpoints(folder: str) -> list[str]:
    """Complete checkpoints, oldest first.

    A checkpoint is written in a temporary folder (its name starts with '.', so it never matches) and renamed
    into place, and pruned by renaming it away before deleting it: a `checkpoint-N` folder is always complete.
    Folders without trainer_state.json (written last) are not ours and are ignored too.
    """
    if not os.path.isdir(folder):
        return []
    found = [n for n in os.listdir(folder) if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()
             and os.path.isfile(os.path.join(folder, n, STATE_FILE))]
    return [os.path.join(folder, n) for n in sorted(found, key=lambda n: int(n.split("-", 1)[1]))]


def _save_checkpoint(run: _Run, state: TrainerState) -> str:
    """accelerate state (optimizer, scheduler, scaler, RNGs; every process) + adapter + trainer state, atomically."""
    accelerator, cfg = run.accelerator, run.cfg
    path = _checkpoint_path(cfg, state.step)
    with _shared_atomic_folder(accelerator, path) as tmp:
        accelerator.save_state(tmp)
        fault_point("checkpoint.write")  # tests: SIGKILL with the temporary folder half written
        if accelerator.is_main_process:
            save_adapter(_current_adapter(run, state), os.path.join(tmp, "adapter"))
            state_dict = {**dataclasses.asdict(state), "last_checkpoint": path, "config": cfg.to_dict(), "num_processes": run.world}
            write_json(os.path.join(tmp, STATE_FILE), state_dict)
    fault_point("checkpoint.saved")  # tests: SIGKILL after the rename, before older checkpoints are pruned
    if accelerator.is_main_process and cfg.checkpoints_total_limit:
        # Pruned only now that the new one is complete; hidden before deletion, so never listed half deleted.
        for old in _list_checkpoints(os.path.join(cfg.output, CHECKPOINTS))[: -cfg.checkpoints_total_limit]:
            discard_folder(old)
    return path


@contextlib.contextmanager
def _shared_atomic_folder(accelerator, path: str):
    """fileio.atomic_folder opened by the main process, its temporary path shared so every process writes into it."""
    from accelerate.utils import broadcast_object_list

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_folder(path)) if accelerator.is_main_process else None
        if accelerator.num_processes > 1:
            tmp = broadcast_object_list([tmp])[0]
        yield tmp
        accelerator.wait_for_everyone()  # all files written before the main process renames the folder into place
    accelerator.wait_for_everyone()


def _resume(run: _Run) -> TrainerState:
    """Load a checkpoint: adapter weights into the UNet, accelerate state, step and loss history."""
    cfg, accelerator = run.cfg, run.accelerator
    path = _resolve_resume(cfg)
    if path is None:
        accelerator.print(f"no checkpoint in {os.path.join(cfg.output, CHECKPOINTS)}; starting a new run")
        return TrainerState()
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f)
    saved_config = saved.get("config", {})
    for key in ("method", "rank", "targets", "lora_alpha"):
        if saved_config.get(key) != cfg.to_dict()[key]:
            raise AdapterkitError(f"checkpoint {path} was made with {key}={saved_config.get(key)!r}, this run has {cfg.to_dict()[key]!r}; use the same setting to resume")
    changed = sorted(k for k, v in cfg.to_dict().items() if k not in ("resume", "quiet") and saved_config.get(k, v) != v)
    if changed:
        accelerator.print(f"resuming with changed settings: {', '.join(changed)}")
    _load_adapter_weights(run, load_adapter(os.path.join(path, "adapter")).tensors)
    accelerator.load_state(path)
    run.dataset.skipped.update({int(k): v for k, v in saved.get("skipped", {}).items()})
    return TrainerState(step=saved["step"], losses=list(saved["losses"]), skipped=dict(run.dataset.skipped), last_checkpoint=path)


def _resolve_resume(cfg: TrainConfig) -> str | None:
    if cfg.resume == "latest":
        found = _list_checkpoints(os.path.join(cfg.output, CHECKPOINTS))
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(cfg.resume, STATE_FILE)):
        raise AdapterkitError(f"--resume {cfg.resume} is not a checkpoint folder (no {STATE_FILE}); pass latest or a checkpoint-N folder")
    return cfg.resume


def _load_adapter_weights(run: _Run, tensors: dict[str, torch.Tensor]) -> None:
    unet = run.accelerator.unwrap_model(run.unet)
    if run.cfg.method == custom_diffusion.METHOD:
        custom_diffusion.swap_in(unet, tensors)
        return
    named = dict(unet.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            module, part = key.rsplit(".lora_", 1)  # "<module>", "A.weight"
            named[f"{module}.lora_{part[0]}.adapterkit_train.weight"].copy_(value)


def _truncate_log(path: str, step: int) -> None:
    """Drop log rows after `step` (all of them for a new run), so the log reads like one uninterrupted run.

    A killed run's rows past its last checkpoint go, and so does a torn last line (a crash mid-write).
    """
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if _log_step(line) <= step]
    with atomic_file(path, "w") as f:
        f.writelines(rows)


def _log_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


# ==================================================================================================== output
def _current_adapter(run: _Run, state: TrainerState) -> Adapter:
    cfg = run.cfg
    unet = run.accelerator.unwrap_model(run.unet)
    tensors = lora.extract(unet) if cfg.method == lora.METHOD else custom_diffusion.extract(unet)
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
    }
    return Adapter(
        method=cfg.method,
        task=cfg.task,
        instructions=run.synonyms or _distinct([run.dataset.instructions[i] for i in run.train_indices]),
        tensors=tensors,
        base={"name_or_path": run.base.name_or_path, "fingerprint": run.base.fingerprint},
        lora=run.lora_config,
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
        _publish(adapter, run.cfg.output)
    accelerator.wait_for_everyone()
    adapter.path = run.cfg.output
    return adapter


def _release_process_group(run: _Run) -> None:
    """Multi-process runs: free the DDP wrapper and destroy the process group while every process is still here.

    Left to interpreter exit, the DDP Reducer's destructor tears down the gloo process group after the first process
    has already gone, and joining gloo's threads can then block forever (seen under torchrun on 2 CPU processes:
    one rank hung in ~ProcessGroupGloo with its adapter already written).
    """
    if run.world <= 1:
        return
    import torch.distributed as dist

    run.accelerator.wait_for_everyone()
    run.unet = run.optimizer = None
    run.accelerator.free_memory()  # drops the accelerator's references to the prepared (DDP) model
    if dist.is_initialized():
        dist.destroy_process_group()


def _publish(adapter: Adapter, output: str) -> None:
    """Write the adapter into OUTPUT in one atomic rename, keeping checkpoints/, validation/ and logs/.

    save_adapter replaces a whole folder, so the adapter is staged inside the new folder and the training
    subfolders are hard-linked in (no data copied; the old links go with the old folder).
    """
    with atomic_folder(output) as tmp:
        staged = save_adapter(adapter, os.path.join(tmp, ".adapter"))
        for name in os.listdir(staged):
            os.rename(os.path.join(staged, name), os.path.join(tmp, name))
        os.rmdir(staged)
        fault_point("publish.write")  # tests: SIGKILL with the new OUTPUT half assembled
        for sub in (CHECKPOINTS, VALIDATION, LOGS):
            if os.path.isdir(os.path.join(output, sub)):
                shutil.copytree(os.path.join(output, sub), os.path.join(tmp, sub), copy_function=_link_or_copy)
    adapter.path = output


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


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


class _StopSignal:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint after the current step and stops. A second Ctrl-C quits at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to quit at once)", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
