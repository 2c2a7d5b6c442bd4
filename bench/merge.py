"""Merging: cost on an SD1.5-sized base, and what each method does to edited images on tiny bases.

    python bench/merge.py [--parts sd15,images,many,grouping] [--repeats 3] [--reg-limit N] [--grouping-sizes ...]

sd15: two Custom Diffusion adapters (random K/V changes, 3 instructions each) on an SD1.5-sized UNet with random
weights and a CLIP ViT-L-sized text encoder, CPU. Feature extraction (cold cache, then warm) and the solve are timed
separately; every method runs side by side on the same inputs, with its target residual, drift and solve time.

images: PSNR of images edited with a merged adapter against the same task's adapter alone (higher = closer), for
each task, on tiny bases with 32- and 128-dim text features, with two kinds of synthetic adapters: full-rank random
K/V noise, and changes along the task's own instruction features only (how gradient training moves K/V). This is
the measurement behind the choice of target token positions (features.py).

many: 8 tasks merged at once, on the bundled base builtin:tiny (v2; 8 demo tasks, one stored phrasing each,
training-like adapters; their never-stored phrasings as probes) and on the SD1.5-sized base (8 random Custom
Diffusion adapters, two instructions each): time, peak memory (RSS growth of a child process per merge), per-task
residual on the written file, prompt residual and probe retention, drift ratio, warnings. `--reg-limit N` uses the
first N regularization prompts only (smoke runs: SD1.5-sized features take minutes on CPU).

grouping: shared-row grouping of R raw rows of width 768 (a quarter of them repeats, as shared prefixes give), in a
child process each: time and peak memory, beside the R x R distance-matrix grouping of earlier versions where it
fits (R <= 4,000).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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


MANY_TINY = ["derain", "cartoonize", "denoise", "lowlight", "sepia", "invert", "blur", "grayscale"]
SD15_WORDS = ["rain", "cartoon", "noise", "light", "sepia", "invert", "blur", "gray"]


def _child_peak(args: list[str]) -> dict:
    """Run this script as a child with `args`; it prints one JSON line (with its peak RSS growth)."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True, check=False,
                         env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def grouping_child(count: int, width: int, rule: str) -> dict:
    from adapterkit.merge import lsq

    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(count - count // 4, width, generator=gen, dtype=torch.float64)
    rows = torch.cat([distinct, distinct[torch.randint(0, distinct.shape[0], (count // 4,), generator=gen)]])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if rule == "sweep":
        groups = len(lsq._group_equal_rows(rows))
    else:  # the R x R grouping of earlier versions (distance matrix, scale matrix, mask)
        norms = rows.norm(dim=1)
        scale = torch.maximum(norms[:, None], norms[None, :]).clamp_min(1e-12)
        close = torch.cdist(rows, rows) <= lsq.SHARED_ROW_TOLERANCE * scale
        groups = int(count - (close.triu(1).any(0)).sum())
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    return {"rows": count, "rule": rule, "groups": groups, "seconds": seconds, "peak_growth_mb": grown,
            "input_mb": rows.numel() * 8 / 1024**2}


def bench_grouping(sizes: list[int]) -> list[dict]:
    out = []
    for count in sizes:
        for rule in ("sweep", "all-pairs"):
            if rule == "all-pairs" and count > 4000:
                out.append({"rows": count, "rule": rule, "peak_growth_mb": 28 * count * count / 1024**2, "note": "not run: 28 R^2 bytes"})
                continue
            out.append(_child_peak(["--grouping-child", str(count), "768", rule]))
    return out


def many_child(which: str, method: str, reg_limit: int | None) -> dict:
    from adapterkit.base import load_base
    from adapterkit.demo.tasks import TASKS as DEMO

    if which == "tiny":
        base = load_base("builtin:tiny")
        sources = [instruction_custom_diffusion(base, t, [DEMO[t].instructions[0]], seed=i + 1) for i, t in enumerate(MANY_TINY)]
        probes = {t: list(DEMO[t].unseen_instructions) for t in MANY_TINY}
    else:
        pipe = sd15_pipeline()
        pipe.set_progress_bar_config(disable=True)
        base = Base(pipe=pipe, name_or_path="sd15-random", fingerprint=compute_fingerprint(pipe.unet), resolution=256)
        sources = [random_custom_diffusion(base, f"task{i}", seed=i + 1, instructions=[f"remove the {w}", f"add {w}"])
                   for i, w in enumerate(SD15_WORDS)]
        probes = {f"task{i}": [f"take out the {w}"] for i, w in enumerate(SD15_WORDS)}
    prompts = features.read_prompts()[:reg_limit] if reg_limit else None
    kwargs = {"positions": "all"} if method == "lsq-soft all" else {}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    try:
        report = merge(sources, base, method.split()[0], quiet=True, reg_prompts=prompts, probe_instructions=probes, **kwargs).report
    except AdapterkitError as e:
        return {"base": which, "method": method, "note": str(e).split(";")[0][:90]}
    seconds = time.perf_counter() - start
    tasks = report["tasks"]

    def pick(key):
        return [t.get(key) for t in tasks if t.get(key) is not None]

    retention = [t["probe"]["retention"] for t in tasks if (t.get("probe") or {}).get("retention") is not None]
    return {
        "base": which, "method": method, "tasks": len(tasks), "rows": report.get("constraint_rows"), "seconds": seconds,
        "solve_s": report["time_s"]["solve"], "features_s": report["time_s"]["features"],
        "peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
        "residual_max": max(pick("residual"), default=None), "prompt_residual_max": max(pick("prompt_residual"), default=None),
        "prompt_residual_linear_max": max(pick("prompt_residual_linear"), default=None),
        "retention_min": min(retention, default=None), "retention_mean": float(np.mean(retention)) if retention else None,
        "drift": report["drift"], "drift_ratio": report.get("drift_ratio"), "warnings": len(report["warnings"]),
    }


def bench_many(reg_limit: int | None) -> list[dict]:
    return [_child_peak(["--many-child", which, method] + (["--reg-limit", str(reg_limit)] if reg_limit else []))
            for which in ("tiny", "sd15") for method in ("lsq", "lsq-soft", "lsq-soft all", "linear")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="sd15,images")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reg-limit", type=int, default=None, help="many: first N regularization prompts (smoke runs)")
    parser.add_argument("--grouping-sizes", default="1000,4000,20000,50000")
    parser.add_argument("--grouping-child", nargs=3, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--many-child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.grouping_child:
        print(json.dumps(grouping_child(int(args.grouping_child[0]), int(args.grouping_child[1]), args.grouping_child[2])))
        return
    if args.many_child:
        print(json.dumps(many_child(args.many_child[0], args.many_child[1], args.reg_limit)))
        return
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
    if "many" in parts:
        result["many"] = bench_many(args.reg_limit)
        print(json.dumps({"many": result["many"]}, indent=2))
        print_table(result["many"], ["base", "method", "tasks", "rows", "seconds", "solve_s", "peak_growth_mb", "residual_max",
                                     "prompt_residual_max", "prompt_residual_linear_max", "retention_mean", "drift_ratio", "warnings", "note"])
    if "grouping" in parts:
        result["grouping"] = bench_grouping([int(x) for x in args.grouping_sizes.split(",")])
        print(json.dumps({"grouping": result["grouping"]}, indent=2))
        print_table(result["grouping"], ["rows", "rule", "groups", "seconds", "peak_growth_mb", "input_mb", "note", "error"])
    if "images" in parts:
        print()
        print_table(result["images"], ["text_dim", "adapters", "method", "psnr_derain", "psnr_cartoonize", "note"])
    if "sd15" in parts:
        print(f"\nfeatures (cold): regularization {result['sd15']['features_cold_s']['regularization']:.1f}s for "
              f"{result['sd15']['regularization_prompts']} prompts, instructions {result['sd15']['features_cold_s']['instructions']:.2f}s; "
              f"warm (cache) {result['sd15']['features_warm_s']:.2f}s; lsq solve {result['sd15']['lsq_solve_s']:.2f}s")


if __name__ == "__main__":
    main()
