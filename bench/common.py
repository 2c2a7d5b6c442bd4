"""Helpers shared by the benchmarks: machine facts, medians, tables, SD1.5-sized random pipelines."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

from adapterkit.threads import configure_threads

THREADS = configure_threads()  # before torch loads OpenMP: every bench that imports this module gets the CLI's setting

import torch  # noqa: E402


def machine() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": THREADS["OMP_WAIT_POLICY"] if THREADS["effective"] else "(torch imported first)",
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # Other processes on the same cores distort timings badly (torch's OpenMP regions wait for descheduled
        # threads): compare only figures taken at a low load average.
        "load_average_1m": os.getloadavg()[0],
    }


def synchronize() -> None:
    """Wait for queued GPU work: CUDA kernels run asynchronously, so a timer read without this measures the launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed ones; GPU work is synchronised before
    each timer read, so the figure includes the kernels `fn` queued."""
    return statistics.median(timed_runs(fn, repeats, warmup))


def timed_runs(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def emit(result: dict, table_rows: list[dict], columns: list[str]) -> None:
    """JSON first (machine-readable), then a short table for people."""
    print(json.dumps(result, indent=2))
    print()
    print_table(table_rows, columns)


def sd15_unet(seed: int = 0):
    """An SD1.5-sized 8-channel IP2P UNet with random weights (859.5M parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=64, in_channels=8, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    )


def sd15_vae(seed: int | None = None):
    """SD1.5's VAE (AutoencoderKL, 83.7M parameters) with random weights; `seed` seeds them (None: as torch stands)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )


def sd15_pipeline(seed: int = 0):
    """SD1.5-sized IP2P pipeline with random weights: UNet, CLIP ViT-L/14 text encoder, SD VAE, tiny tokenizer."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapterkit.tiny import make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    unet = sd15_unet(seed)
    vae = sd15_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    ))
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=EulerAncestralDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
