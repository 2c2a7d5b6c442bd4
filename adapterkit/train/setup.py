"""Training setup helpers the recipe in loop.py calls once: the accelerator, the held-out rows, the trainable adapter
(through the method protocol: `make_trainable` of adapters/<method>.py), the optimizer.
"""

from __future__ import annotations

import os

import torch

from ..adapters import get_method
from ..errors import AdapterkitError
from .batches import seeded_generator
from .checkpoints import LOGS
from .config import TrainConfig


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available

    reset_accelerate_state()
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
    if not cfg.quiet:  # as edit and eval say where they run (devices.py); accelerate picks the GPU when it sees one
        processes = f", {accelerator.num_processes} processes" if accelerator.num_processes > 1 else ""
        accelerator.print(f"device: {accelerator.device.type}, mixed precision {cfg.mixed_precision}{processes}")
    return accelerator


def reset_accelerate_state() -> None:
    """accelerate keeps one global state per process; a second train() (notebook, tests) may want another precision.

    Inside a launched multi-process run the process group stays: only the per-run part is cleared.
    """
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=not (dist.is_available() and dist.is_initialized()))
    GradientState._reset_state()


def init_trackers(accelerator, config_dict: dict) -> None:
    """Called once setup passed, so that a run refused for bad data or a bad base writes nothing under OUTPUT."""
    if accelerator.log_with:
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config_dict.items()}
        accelerator.init_trackers("adapterkit", config=config)


def hold_out(n: int, cfg: TrainConfig) -> tuple[list[int], list[int]]:
    """(validation rows, training rows): a seeded random choice of `validation_rows` rows is never trained on. A
    dataset with fewer than twice as many rows is trained on whole, without validation (`too_few_to_hold_out` says
    so): holding out would leave fewer rows to learn from than to judge by (session 22: 4 rows with the defaults
    stopped with an error)."""
    if not cfg.validation_steps or too_few_to_hold_out(n, cfg):
        return [], list(range(n))
    chosen = sorted(torch.randperm(n, generator=seeded_generator(cfg.seed, "validation")).tolist()[: cfg.validation_rows])
    return chosen, [i for i in range(n) if i not in set(chosen)]


def too_few_to_hold_out(n: int, cfg: TrainConfig) -> str:
    """The note `train` prints when validation is on but the data is too small for `hold_out`, else ""."""
    if not cfg.validation_steps or n >= 2 * cfg.validation_rows:
        return ""
    fewer = f" (pass --validation-rows {n // 2} to validate on fewer)" if n >= 2 else ""
    return (f"validation off: {n} rows are too few to hold out {cfg.validation_rows} (--validation-rows) and train on "
            f"at least as many; every row trains{fewer}")


def check_resolution(base, resolution: int) -> None:
    # The UNet halves the latent once per down block but the last: latents must divide by 2^(blocks - 1).
    multiple = base.pipe.vae_scale_factor * 2 ** (len(base.unet.config.block_out_channels) - 1)
    if resolution % multiple:
        raise AdapterkitError(f"--resolution {resolution} must be a multiple of {multiple} for this base")


def make_adapter_trainable(cfg: TrainConfig, base, accelerator) -> tuple[list[torch.nn.Parameter], dict | None]:
    """Freeze everything, attach the adapter, check that nothing else trains, set devices and dtypes.

    Returns (trainable parameters, the method's options as the adapter will record them).
    """
    from accelerate.utils import set_seed

    unet, vae, text_encoder = base.pipe.unet, base.pipe.vae, base.pipe.text_encoder
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    set_seed(cfg.seed)  # peft's gaussian LoRA init draws from the global RNG: same init on every process and run
    method = get_method(cfg.method)
    options = method.training_options(cfg.to_dict())
    params = method.make_trainable(unet, options)
    assert_only_adapter_trains(method, base, params)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    weight_dtype = frozen_weight_dtype(cfg.mixed_precision)
    cast_frozen_weights(unet, weight_dtype)
    vae.to(accelerator.device, weight_dtype)
    text_encoder.to(accelerator.device, weight_dtype)
    return params, options


def frozen_weight_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights are stored in: half precision whenever autocast runs in it (GPU and CPU alike, so the
    CPU tests take the code path a GPU run takes; CPU allows bf16 only, see make_accelerator)."""
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[mixed_precision]


def cast_frozen_weights(unet, weight_dtype: torch.dtype) -> None:
    """Frozen UNet weights to `weight_dtype` (halves their memory); trainable ones stay fp32.

    The trainable ones must: the optimizer keeps fp32 master weights, and under fp16 accelerate's GradScaler refuses
    fp16 gradients ("Attempting to unscale FP16 gradients"). Autocast computes each matmul in the half dtype anyway.
    """
    for p in unet.parameters():
        if not p.requires_grad and p.dtype != weight_dtype:
            p.data = p.data.to(weight_dtype)
    wrong = [(n, p.dtype) for n, p in unet.named_parameters() if p.requires_grad and p.dtype != torch.float32]
    if wrong:
        raise RuntimeError(f"trainable UNet parameter {wrong[0][0]} is {wrong[0][1]}; trainable parameters must stay float32")


def assert_only_adapter_trains(method, base, params: list[torch.nn.Parameter]) -> None:
    """A bug guard: every trainable parameter is an adapter parameter, and the VAE and text encoder are frozen."""
    ours = {id(p) for p in params}
    for name, p in base.pipe.unet.named_parameters():
        if p.requires_grad != (id(p) in ours) or (p.requires_grad and not method.is_adapter_parameter(name)):
            raise RuntimeError(f"UNet parameter {name} has requires_grad={p.requires_grad}; only {method.METHOD} parameters may train")
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


def row_counts(dataset, validation_indices: list[int], train_indices: list[int], skipped: int) -> dict:
    """What training used of the data, for adapter.json's training.rows and the lines `adapterkit train` prints.

    in_data: rows of the split; selected: those left after --data-task, --limit and empty instructions;
    held_out: validation rows (never trained on; their row numbers in held_out_source_rows); training: the rest;
    skipped: training rows whose images were unreadable."""
    return {
        "in_data": dataset.source_rows, "selected": len(dataset), "without_instruction": len(dataset.dropped),
        "held_out": len(validation_indices), "training": len(train_indices), "skipped": skipped,
        "held_out_source_rows": [dataset.rows[i] for i in validation_indices],
    }


def describe_rows(cfg, split: str, rows: dict) -> str:
    """One line: 'data: 256 rows in DATA (split train); 64 of task derain; 4 held out for validation, 60 to train on'."""
    selected = [f"{rows['selected']} of task {cfg.data_task}"] if cfg.data_task else []
    selected += [f"{rows['without_instruction']} without an instruction left out"] if rows["without_instruction"] else []
    selected += [f"first {cfg.limit} kept (--limit)"] if cfg.limit is not None and rows["selected"] == cfg.limit else []
    held = f"{rows['held_out']} held out for validation, " if rows["held_out"] else ""
    note = too_few_to_hold_out(rows["selected"], cfg)
    return "; ".join([f"data: {rows['in_data']} rows in {cfg.data} (split {split})", *selected,
                      f"{held}{rows['training']} to train on"]) + (f"\n{note}" if note else "")
