"""Mixed-adapter batches: one mixed call vs sequential swap + edit vs grouped by adapter; memory of resident adapters.

    python bench/batch.py [--sizes tiny,sd15] [--batch 8] [--repeats 3] [--growth-batches 500] [--smoke]

For each base (tiny: the bundled builtin:tiny; sd15: an SD1.5-sized random IP2P pipeline, CPU, small resolution),
a bank holds 4 adapters (2 Custom Diffusion, 2 LoRA on attn2 K/V, ranks 4 and 8); `--batch` images cycle
through them. Modes, each timed as the median of --repeats runs of the whole batch:
  mixed       one `bank.edit_batch` call, every image with its own adapter and seed
  sequential  one `bank.edit` per image (activate = swap, then a batch-1 pipeline call)
  grouped     one `edit_batch` per adapter (images of one adapter together)
  single      one `edit_batch` of the same size, every image with one adapter (the mixed target's reference)
Ceiling: the UNet's forward alone, `--batch` calls of 3 rows (one image's guidance branches) against one call of all
of them: how much any batching can gain on this machine.
Memory: process RSS (from /proc/self/statm) with 50 adapters resident (tiny) and 8 (sd15), bytes per adapter, and
RSS over --growth-batches mixed batches (tiny) and --growth-batches // 25 (sd15), first tenth vs the end.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

import torch  # noqa: E402
from common import emit, machine, median_seconds, sd15_pipeline  # noqa: E402

from adapterkit.adapters.bank import AdapterBank  # noqa: E402
from adapterkit.base import load_base  # noqa: E402
from adapterkit.testing import random_custom_diffusion, random_image, random_lora  # noqa: E402

SETTINGS = {"tiny": {"resolution": 64, "steps": 4, "resident": 50}, "sd15": {"resolution": 64, "steps": 2, "resident": 8}}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_adapter(base, i: int):
    if i % 2 == 0:
        return random_custom_diffusion(base, f"cd{i}", seed=i, instructions=[f"edit number {i}"])
    return random_lora(base, f"lora{i}", rank=4 if i % 4 == 1 else 8, seed=i, instructions=[f"edit number {i}"])


def load(size: str):
    return load_base("builtin:tiny") if size == "tiny" else sd15_pipeline()


def unet_batching_ceiling(pipe, batch: int, resolution: int, repeats: int) -> float:
    """What batching can save at most: `batch` UNet forwards of one image's three guidance rows over one forward of
    all 3 x `batch` rows (noise, timestep and text random; the pipeline's other work left out). mixed_vs_sequential
    cannot exceed it by much: on a CPU whose convolutions gain little from a larger batch, neither can any batching."""
    unet, side = pipe.unet, resolution // pipe.vae_scale_factor

    def forward(rows: int):
        x = torch.randn(rows, unet.config.in_channels, side, side, device=unet.device, dtype=unet.dtype)
        text = torch.randn(rows, 77, unet.config.cross_attention_dim, device=unet.device, dtype=unet.dtype)
        t = torch.full((rows,), 500, device=unet.device)
        return lambda: unet(x, t, encoder_hidden_states=text)

    with torch.no_grad():
        return median_seconds(forward(3), repeats) * batch / median_seconds(forward(3 * batch), repeats)


def timings(size: str, batch: int, repeats: int) -> dict:
    cfg = SETTINGS[size]
    base = load(size)
    bank = AdapterBank(base)
    tasks4 = [bank.add(make_adapter(bank.base, i)) for i in range(4)]
    images = [random_image(i, cfg["resolution"]) for i in range(batch)]
    texts = [f"edit number {i}" for i in range(batch)]
    tasks = [tasks4[i % 4] for i in range(batch)]
    seeds = list(range(batch))
    opts = dict(steps=cfg["steps"], output_type="np")

    def sequential():
        for img, text, task, seed in zip(images, texts, tasks, seeds):
            bank.edit(img, text, task=task, seed=seed, **opts)

    def grouped():
        for task in tasks4:
            idx = [i for i, t in enumerate(tasks) if t == task]
            bank.edit_batch([images[i] for i in idx], [texts[i] for i in idx], [task] * len(idx), [seeds[i] for i in idx], **opts)

    modes = {
        "mixed": lambda: bank.edit_batch(images, texts, tasks, seeds, **opts),
        "sequential": sequential,
        "grouped": grouped,
        "single": lambda: bank.edit_batch(images, texts, [tasks4[0]] * batch, seeds, **opts),
    }
    seconds = {name: median_seconds(fn, repeats) for name, fn in modes.items()}
    ceiling = unet_batching_ceiling(bank.pipe, batch, cfg["resolution"], max(repeats, 5))
    bank.close()
    return {"size": size, "batch": batch, "adapters": 4, **cfg, "seconds": seconds,
            "images_per_s": {k: batch / v for k, v in seconds.items()},
            "mixed_vs_sequential": seconds["sequential"] / seconds["mixed"],
            "mixed_vs_grouped": seconds["grouped"] / seconds["mixed"],
            "mixed_over_single": seconds["mixed"] / seconds["single"], "unet_batching_ceiling": ceiling}


def memory(size: str, batch: int, growth_batches: int) -> dict:
    cfg = SETTINGS[size]
    before_base = rss_mb()
    base = load(size)
    bank = AdapterBank(base)
    with_base = rss_mb()
    for i in range(cfg["resident"]):
        bank.add(make_adapter(bank.base, i))
    resident = rss_mb()
    per_adapter = {t: bank.state_bytes(t) for t in bank.tasks}
    images = [random_image(i, 32) for i in range(batch)]
    texts = [f"edit number {i}" for i in range(batch)]
    samples = []
    for k in range(growth_batches):
        tasks = [bank.tasks[(k * batch + i) % len(bank.tasks)] for i in range(batch)]
        bank.edit_batch(images, texts, tasks, [k * batch + i for i in range(batch)], steps=1, output_type="np")
        samples.append(rss_mb())
    tenth = max(1, growth_batches // 10)
    bank.close()
    return {"size": size, "resident_adapters": cfg["resident"], "rss_mb_before_base": before_base,
            "rss_mb_base": with_base, "rss_mb_resident": resident, "rss_mb_per_adapter": (resident - with_base) / cfg["resident"],
            "state_mb_per_adapter_mean": sum(per_adapter.values()) / len(per_adapter) / 2**20,
            "growth_batches": growth_batches,
            "rss_mb_after_first_tenth": samples[tenth - 1] if samples else None,
            "rss_mb_end": samples[-1] if samples else None,
            "rss_growth_mb": (samples[-1] - samples[tenth - 1]) if samples else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="tiny,sd15")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--growth-batches", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="1 repeat, 20 growth batches (a check that it runs)")
    args = parser.parse_args(argv)
    repeats, growth = (1, 20) if args.smoke else (args.repeats, args.growth_batches)
    sizes = args.sizes.split(",")
    speed = [timings(size, args.batch, repeats) for size in sizes]
    mem = [memory(size, args.batch, growth if size == "tiny" else max(2, growth // 25)) for size in sizes]
    result = {"bench": "batch", "machine": machine(), "repeats": repeats, "timings": speed, "memory": mem}
    table = [{"size": s["size"], "mode": m, "images/s": s["images_per_s"][m], "seconds": s["seconds"][m],
              "vs mixed": s["seconds"][m] / s["seconds"]["mixed"]} for s in speed for m in s["seconds"]]
    emit(result, table, ["size", "mode", "images/s", "seconds", "vs mixed"])
    print()
    for s in speed:
        print(f"{s['size']}: mixed vs sequential {s['mixed_vs_sequential']:.2f}x; the UNet alone gains "
              f"{s['unet_batching_ceiling']:.2f}x from one batch of {3 * s['batch']} rows over {s['batch']} of 3 (the ceiling)")
    for m in mem:
        print(f"{m['size']}: {m['resident_adapters']} adapters resident: RSS {m['rss_mb_resident']:.0f} MB (base alone "
              f"{m['rss_mb_base']:.0f} MB, +{m['rss_mb_per_adapter']:.2f} MB per adapter, state {m['state_mb_per_adapter_mean']:.2f} MB); "
              f"{m['growth_batches']} mixed batches: RSS {m['rss_mb_after_first_tenth']:.0f} -> {m['rss_mb_end']:.0f} MB")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    sys.exit(main())
