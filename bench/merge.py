"""Merging: cost on an SD1.5-sized base, and what each method does to edited images on tiny bases.

    python bench/merge.py [--parts sd15,images] [--repeats 3]

sd15: two Custom Diffusion adapters (random K/V changes, 3 instructions each) on an SD1.5-sized UNet with random
weights and a CLIP ViT-L-sized text encoder, CPU. Feature extraction (cold cache, then warm) and the solve are timed
separately; every method runs side by side on the same inputs, with its target residual, drift and solve time.

images: PSNR of images edited with a merged adapter against the same task's adapter alone (higher = closer), for
each task, on tiny bases with 32- and 128-dim text features, with two kinds of synthetic adapters: full-rank random
K/V noise, and changes along the task's own instruction features only (how gradient training moves K/V). This is
the measurement behind the choice of target token positions (features.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import emit, machine, print_table, sd15_pipeline  # noqa: E402

from adapterkit.adapters.bank import AdapterBank  # noqa: E402
from adapterkit.base import Base, compute_fingerprint  # noqa: E402
from adapterkit.errors import AdapterkitError  # noqa: E402
from adapterkit.eval.metrics import psnr  # noqa: E402
from adapterkit.merge import features, merge  # noqa: E402
from adapterkit.testing import instruction_custom_diffusion, random_custom_diffusion, random_image  # noqa: E402

# Words of the tiny tokenizer's vocabulary, so each instruction is a few tokens as with the real CLIP BPE.
# "make it ..." is a shared causal prefix: its rows get the mean target (residual_all_rows includes them).
TASKS = {
    "derain": ["derain the image", "remove rain", "make it clear"],
    "cartoonize": ["cartoonize the image", "make it a cartoon", "cartoon style"],
}
METHODS = [("lsq", {}), ("lsq-soft", {}), ("linear", {}), ("sum", {}), ("ties", {}), ("dare", {}), ("svd", {"rank": 16})]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def bench_sd15(repeats: int) -> tuple[dict, list[dict]]:
    pipe = sd15_pipeline()
    pipe.set_progress_bar_config(disable=True)
    base = Base(pipe=pipe, name_or_path="sd15-random", fingerprint=compute_fingerprint(pipe.unet), resolution=256)
    sources = [random_custom_diffusion(base, t, seed=i + 1, instructions=instr) for i, (t, instr) in enumerate(TASKS.items())]
    prompts = features.read_prompts()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["ADAPTERKIT_CACHE"] = cache
        start = time.perf_counter()
        features.regularization_gram(base, prompts)
        cold_reg = time.perf_counter() - start
        start = time.perf_counter()
        features.instruction_features(base, [t for s in sources for t in s.instructions])
        cold_instr = time.perf_counter() - start
        start = time.perf_counter()
        features.regularization_gram(base, prompts)
        features.instruction_features(base, [t for s in sources for t in s.instructions])
        warm = time.perf_counter() - start
        rows = []
        for method, kwargs in METHODS:
            runs = [merge(sources, base, method, quiet=True, **kwargs) for _ in range(repeats)]
            report = runs[-1].report
            rows.append({
                "method": method,
                "solve_s": float(np.median([r.report["time_s"]["solve"] for r in runs])),
                "report_s": float(np.median([r.report["time_s"]["report"] for r in runs])),
                "total_s": float(np.median([r.report["time_s"]["total"] for r in runs])),
                "residual_max": max(t["residual"] for t in report["tasks"]),
                "residual_all_rows_max": max((t["residual_all_rows"] or t["residual"]) for t in report["tasks"]),
                "drift": report["drift"],
                "rank_max": report["rank"]["max"],
            })
        os.environ.pop("ADAPTERKIT_CACHE")
    linear_solve = next(r["solve_s"] for r in rows if r["method"] == "linear")
    for r in rows:
        r["solve_vs_linear"] = r["solve_s"] / max(linear_solve, 1e-9)
    lsq_report = next(r for r in rows if r["method"] == "lsq")
    result = {
        "base": "SD1.5-sized UNet (random), CLIP ViT-L-sized text encoder (random), tiny tokenizer",
        "kv_layers": len(sources[0].tensors),
        "kv_parameters": sum(t.numel() for t in sources[0].tensors.values()),
        "regularization_prompts": len(prompts),
        "instructions": {t: len(i) for t, i in TASKS.items()},
        "features_cold_s": {"regularization": cold_reg, "instructions": cold_instr},
        "features_warm_s": warm,
        "lsq_solve_s": lsq_report["solve_s"],
        "methods": rows,
        "peak_rss_gb": peak_rss_gb(),
    }
    return result, rows


def bench_images() -> list[dict]:
    from adapterkit.tiny import make_tiny_pipeline

    instructions = {"derain": "derain the image", "cartoonize": "cartoonize the image"}
    variants = [("linear", {}), ("lsq", {"positions": "eos"}), ("lsq", {"positions": "all"}),
                ("lsq-soft", {"positions": "all", "target_weight": 100.0})]
    images = [random_image(0), random_image(1)]
    rows = []
    for text_dim in (32, 128):
        pipe = make_tiny_pipeline(0, text_dim=text_dim)
        pipe.set_progress_bar_config(disable=True)
        base = Base(pipe=pipe, name_or_path=f"tiny-text{text_dim}", fingerprint=compute_fingerprint(pipe.unet), resolution=64)
        for kind in ("random", "instruction"):
            if kind == "random":
                sources = [random_custom_diffusion(base, t, seed=s, strength=1.0, instructions=[i]) for s, (t, i) in enumerate(instructions.items(), 1)]
            else:
                sources = [instruction_custom_diffusion(base, t, [i], seed=s) for s, (t, i) in enumerate(instructions.items(), 1)]
            bank = AdapterBank(base)
            for s in sources:
                bank.add(s)
            reference = {t: [bank.edit(im, i, task=t, steps=4, seed=0) for im in images] for t, i in instructions.items()}
            base_row = {"text_dim": text_dim, "adapters": kind, "method": "base (no adapter)"}
            for t, i in instructions.items():
                base_row[f"psnr_{t}"] = float(np.mean([psnr(bank.edit(im, i, task=None, steps=4, seed=0), r) for im, r in zip(images, reference[t])]))
            rows.append(base_row)
            bank.deactivate()  # the live K/V are the base's again: later banks snapshot them as the base
            for method, kwargs in variants:
                label = method + (f" {kwargs['positions']}" if "positions" in kwargs else "")
                row = {"text_dim": text_dim, "adapters": kind, "method": label}
                try:
                    merged = merge(sources, base, method, quiet=True, **kwargs).adapter
                except AdapterkitError as e:
                    row["note"] = str(e).split(";")[0][:70]
                    rows.append(row)
                    continue
                merged_bank = AdapterBank(base)
                merged_bank.add(merged)
                for t, i in instructions.items():
                    edits = [merged_bank.edit(im, i, task=merged.task, steps=4, seed=0) for im in images]
                    row[f"psnr_{t}"] = float(np.mean([psnr(e, r) for e, r in zip(edits, reference[t])]))
                merged_bank.deactivate()
                rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="sd15,images")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    parts = args.parts.split(",")
    result = {"machine": machine()}
    if "images" in parts:
        result["images"] = bench_images()
    rows = []
    if "sd15" in parts:
        result["sd15"], rows = bench_sd15(args.repeats)
    if rows:
        emit(result, rows, ["method", "solve_s", "solve_vs_linear", "report_s", "total_s", "residual_max", "residual_all_rows_max", "drift", "rank_max"])
    else:
        print(json.dumps(result, indent=2))
    if "images" in parts:
        print()
        print_table(result["images"], ["text_dim", "adapters", "method", "psnr_derain", "psnr_cartoonize", "note"])
    if "sd15" in parts:
        print(f"\nfeatures (cold): regularization {result['sd15']['features_cold_s']['regularization']:.1f}s for "
              f"{result['sd15']['regularization_prompts']} prompts, instructions {result['sd15']['features_cold_s']['instructions']:.2f}s; "
              f"warm (cache) {result['sd15']['features_warm_s']:.2f}s; lsq solve {result['sd15']['lsq_solve_s']:.2f}s")


if __name__ == "__main__":
    main()
