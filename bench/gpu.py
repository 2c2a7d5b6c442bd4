"""One-shot GPU suite: training memory and speed through the real `train()`, hot-swap latency, torch.compile.

    python bench/gpu.py --json gpu.json     # one H100/H200: ~5-8 minutes
    python bench/gpu.py --smoke             # tiny shapes, 2 steps, CPU (bf16 for fp16): what the test suite runs

1. Base: an SD1.5-shaped IP2P pipeline with random weights (UNet 859.5M parameters, CLIP ViT-L/14-sized text
   encoder, SD VAE; bench/common.sd15_pipeline), built on the device and saved to a temporary folder.
2. Training rows, each one `train(TrainConfig)` from that folder (data stream, loss, accelerate fp16 autocast with
   GradScaler, frozen weights cast to fp16, gradient checkpointing, 8-bit AdamW, final save): Custom Diffusion,
   LoRA r4 (attn2 K/V) and a full fine-tune of the UNet (bench/full_finetune.py, registered as a method) at
   256 px batch 4 and 512 px batch 1, plus the full fine-tune at 512 px with torch's fp32-state AdamW. Figures:
   peak VRAM (torch.cuda.max_memory_allocated over the whole run: load, training, save), seconds per step
   (median over the steps after --warmup, from the run's own train_log.jsonl; every step ends in a host sync
   when the loss is read), and both as ratios to the full fine-tune of the same resolution and optimizer.
3. Hot-swap: an AdapterBank on the fp16 pipeline with two Custom Diffusion and two LoRA (r4, r8) adapters; median
   `bank.activate` time between two adapters of one method, CUDA-synchronised.
4. torch.compile (inductor): edit latency (512 px, 20 steps) eager vs compiled, compile time, and the graphs
   compiled across 10 swaps that mix both methods and the base (must be 0).
5. Mixed-adapter batches (`AdapterBank.edit_batch`, when the installed adapterkit has it): images/s of one call
   editing 4 images with 4 different adapters vs 4 single edits.
6. `adapterkit edit` as a user runs it, in a fresh process with the default --device / --dtype (the GPU when torch
   sees one, float32): the device line it printed, its exit code and wall time (start-up and base load included);
   then with --dtype of the bank above: the largest pixel difference from the bank's own edit.

Prints one JSON object (machine, settings, each section) and a table per section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py, bench/full_finetune.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally; the GPU machine has no network

import full_finetune  # noqa: E402
from common import machine, median_seconds, print_table, sd15_pipeline, synchronize  # noqa: E402

import torch  # noqa: E402

FULL = full_finetune.METHOD
METHODS = ("custom-diffusion", "lora", FULL)
SHAPES = ((256, 4), (512, 1))  # (resolution, batch size)
SMOKE_RESOLUTION = {256: 32, 512: 64}  # tiny-base stand-ins, same batch sizes
SWAP_ORDER = ("lora_b", "cd_a", "lora_a", "cd_b", None, "lora_a", "cd_a", "lora_b", "cd_b", "lora_a")  # 10 swaps


# ================================================================================================ setup
def build_base(folder: str, smoke: bool) -> str:
    if smoke:
        from adapterkit.tiny import save_tiny_pipeline

        return save_tiny_pipeline(folder, seed=0)
    with torch.device("cuda"):  # random init of 1.07B parameters takes seconds on the GPU, a minute on the CPU
        pipe = sd15_pipeline(seed=0)
    pipe.save_pretrained(folder)
    del pipe
    _free()
    return folder


def build_data(folder: str, size: int, rows: int) -> str:
    from adapterkit.testing import make_edit_dataset

    return make_edit_dataset(folder, rows, size=size)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gb(n_bytes: float) -> float:
    return round(n_bytes / 2**30, 3)


# ================================================================================================ training
def train_rows(base_dir: str, workdir: str, args) -> list[dict]:
    plan = [(m, r, b, "adamw8bit") for r, b in SHAPES for m in METHODS] + [(FULL, 512, 1, "adamw")]
    rows = []
    for method, resolution, batch, optimizer in plan:
        if args.smoke:
            resolution = SMOKE_RESOLUTION[resolution]
        data = os.path.join(workdir, f"data-{resolution}")
        if not os.path.isdir(data):
            build_data(data, resolution, rows=8)
        try:
            rows.append(train_one(base_dir, data, workdir, method, resolution, batch, optimizer, args))
        except Exception as e:  # noqa: BLE001 - an OOM or failure is a row of the report, not the end of the suite
            rows.append({"method": method, "resolution": resolution, "batch_size": batch, "optimizer": optimizer,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]})
        _free()
        print(f"  train {method} {resolution}px b{batch} {optimizer}: {rows[-1].get('s_per_step', rows[-1].get('error'))}", file=sys.stderr)
    for row in rows:
        ref = next((r for r in rows if r["method"] == FULL and r["resolution"] == row["resolution"]
                    and r["optimizer"] == row["optimizer"] and "s_per_step" in r), None)
        if ref and "s_per_step" in row:
            row["steps_per_s_vs_full"] = round(ref["s_per_step"] / row["s_per_step"], 3)
            if ref.get("peak_vram_gb"):
                row["vram_vs_full"] = round(row["peak_vram_gb"] / ref["peak_vram_gb"], 3)
    return rows


def train_one(base_dir, data, workdir, method, resolution, batch, optimizer, args) -> dict:
    from adapterkit.train import TrainConfig, train

    output = os.path.join(workdir, f"out-{method}-{resolution}-{batch}-{optimizer}")
    cfg = TrainConfig(
        base=base_dir, data=data, method=method, task="bench", output=output, resolution=resolution, steps=args.steps,
        batch_size=batch, optimizer=optimizer, mixed_precision=args.precision, gradient_checkpointing=True, rank=4,
        targets="kv", validation_steps=0, checkpoint_steps=0, log_with="none", quiet=True, cpu=args.smoke,
    )
    cuda = torch.cuda.is_available() and not args.smoke
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    started = time.perf_counter()
    adapter = train(cfg)
    synchronize()
    wall = time.perf_counter() - started
    with open(os.path.join(output, "logs", "train_log.jsonl")) as f:
        step_s = [batch / json.loads(line)["images_per_second"] for line in f]  # one process: images/step = batch
    timed = step_s[args.warmup:] or step_s
    row = {
        "method": method, "resolution": resolution, "batch_size": batch, "optimizer": optimizer,
        "precision": args.precision, "gradient_checkpointing": True, "steps": len(step_s),
        "trainable_params_m": round(sum(t.numel() for t in adapter.tensors.values()) / 1e6, 3),
        "s_per_step": round(statistics.median(timed), 4), "images_per_s": round(batch / statistics.median(timed), 2),
        "final_loss": adapter.training["final_loss"], "wall_s": round(wall, 1),
    }
    if cuda:
        row["peak_vram_gb"] = _gb(torch.cuda.max_memory_allocated())
        row["allocated_before_gb"] = _gb(before)  # left over from earlier rows (should be ~0)
    del adapter
    return row


# ================================================================================================ swap, compile
def random_bank(base_dir: str, device: str, dtype):
    from adapterkit.adapters.bank import AdapterBank
    from adapterkit.base import load_base
    from adapterkit.testing import random_custom_diffusion, random_lora

    base = load_base(base_dir, dtype=dtype, device=device)
    bank = AdapterBank(base)
    for adapter in (random_custom_diffusion(base, "cd_a", seed=1), random_custom_diffusion(base, "cd_b", seed=2),
                    random_lora(base, "lora_a", rank=4, seed=3), random_lora(base, "lora_b", rank=8, seed=4)):
        bank.add(adapter)
    return bank


def swap_rows(bank, repeats: int) -> list[dict]:
    rows = []
    for method, (a, b) in (("custom-diffusion", ("cd_a", "cd_b")), ("lora", ("lora_a", "lora_b"))):
        state = {"next": a}

        def swap():
            bank.activate(state["next"])
            state["next"] = b if state["next"] == a else a

        rows.append({"method": method, "swap_ms": round(median_seconds(swap, repeats=repeats, warmup=2) * 1e3, 4),
                     "adapter_params_m": round(sum(t.numel() for t in bank.get(a).tensors.values()) / 1e6, 3)})
    bank.deactivate()
    return rows


def compile_section(bank, image, gen: dict, backend: str, repeats: int) -> dict:
    """Eager vs compiled edit latency, and graphs compiled by 10 swaps after the first compiled edit."""
    from torch._dynamo.utils import counters

    edit = lambda task: bank.edit(image, "edit the image", task=task, **gen)  # noqa: E731
    eager_s = median_seconds(lambda: edit("cd_a"), repeats=repeats, warmup=1)
    bank.prepare()  # sizes the live LoRA slot before compiling (README: Python API)
    torch._dynamo.reset()
    bank.pipe.unet = torch.compile(bank.pipe.unet, backend=backend)
    synchronize()
    started = time.perf_counter()
    edit("cd_a")  # compiles
    synchronize()
    first_s = time.perf_counter() - started
    graphs = counters["stats"]["unique_graphs"]
    for task in SWAP_ORDER:
        edit(task)
    compiled_s = median_seconds(lambda: edit("lora_a"), repeats=repeats, warmup=0)
    recompiles = counters["stats"]["unique_graphs"] - graphs  # the timed edits count too
    return {"backend": backend, "edit_eager_s": round(eager_s, 4), "first_compiled_edit_s": round(first_s, 2),
            "edit_compiled_s": round(compiled_s, 4), "compiled_speedup": round(eager_s / compiled_s, 3),
            "swaps": len(SWAP_ORDER), "recompiles": int(recompiles)}


def mixed_batch_section(bank, image, gen: dict, repeats: int) -> dict:
    """One edit_batch call with 4 adapters vs 4 single edits (issue 13's AdapterBank.edit_batch)."""
    if not hasattr(bank, "edit_batch"):
        return {"skipped": "this adapterkit has no AdapterBank.edit_batch (mixed-adapter batches, issue 13)"}
    tasks = ["cd_a", "cd_b", "lora_a", "lora_b"]
    images, instructions = [image] * len(tasks), ["edit the image"] * len(tasks)
    options = {k: v for k, v in gen.items() if k != "seed"}  # edit_batch takes one seed per image
    seeds = [gen.get("seed", 0)] * len(tasks)
    batch_s = median_seconds(lambda: bank.edit_batch(images, instructions, tasks=tasks, seeds=seeds, **options), repeats=repeats, warmup=1)
    single_s = median_seconds(lambda: [bank.edit(image, "edit the image", task=t, **gen) for t in tasks], repeats=repeats, warmup=1)
    return {"images": len(tasks), "batch_images_per_s": round(len(tasks) / batch_s, 3),
            "single_images_per_s": round(len(tasks) / single_s, 3), "batch_speedup": round(single_s / batch_s, 3)}


def cli_section(bank, base_dir: str, workdir: str, image, gen: dict) -> dict:
    """`python -m adapterkit edit` with one of the bank's adapters (section 6): once with no --device / --dtype
    (where it runs, how long the command takes), once in the bank's dtype (its pixels against the bank's edit)."""
    import subprocess

    import numpy as np
    from PIL import Image

    from adapterkit.adapters import Adapter, save_adapter

    adapter = bank.get("cd_a")
    saved = save_adapter(Adapter(**{**adapter.__dict__, "tensors": {k: v.detach().cpu().float() for k, v in adapter.tensors.items()}}),
                         os.path.join(workdir, "cd_a"))
    image_path = os.path.join(workdir, "in.png")
    image.save(image_path)

    def command(output: str, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "adapterkit", "edit", "--base", base_dir, "--adapter", saved, image_path,
                               "--instruction", "edit the image", "--output", output, "--steps", str(gen["steps"]),
                               "--seed", str(gen["seed"]), "--quiet", *extra], capture_output=True, text=True)
        return done, time.perf_counter() - started

    default, seconds = command(os.path.join(workdir, "default.png"))
    row = {"exit_code": default.returncode, "wall_s": round(seconds, 2),
           "device_line": next((line for line in default.stderr.splitlines() if line.startswith("device:")), None)}
    dtype = str(bank.pipe.unet.dtype).replace("torch.", "")
    same, _ = command(os.path.join(workdir, "same.png"), "--dtype", dtype)
    if default.returncode or same.returncode:
        return {**row, "error": (default.stderr or same.stderr).strip().splitlines()[-1:]}
    ours = np.asarray(bank.edit(image, "edit the image", task="cd_a", **gen)).astype(np.int16)
    theirs = np.asarray(Image.open(os.path.join(workdir, "same.png")).convert("RGB")).astype(np.int16)
    return {**row, "compared_dtype": dtype, "max_diff_vs_bank": int(np.abs(ours - theirs).max())}


def inference_sections(base_dir: str, args, workdir: str) -> dict:
    from adapterkit.testing import random_image

    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.float16)
    size, steps = (32, 2) if args.smoke else (512, 20)
    gen = {"steps": steps, "seed": 0}
    image = random_image(0, size)
    with torch.no_grad():
        bank = random_bank(base_dir, device, dtype)
        out = {"swap": swap_rows(bank, args.swap_repeats)}
        out["mixed_batch"] = mixed_batch_section(bank, image, gen, args.edit_repeats)  # eager, before compiling
        out["cli_edit"] = cli_section(bank, base_dir, workdir, image, gen)  # eager, as the command runs
        out["compile"] = compile_section(bank, image, gen, args.compile_backend, args.edit_repeats)
    out["edit_settings"] = {"size": size, "steps": steps, "dtype": str(dtype).replace("torch.", ""), "device": device}
    torch._dynamo.reset()
    del bank
    _free()
    return out


# ================================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny base, 2 steps, CPU: checks the suite runs")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training row (default 20; smoke 2)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps left out of the step time (default 3; smoke 0)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; smoke aot_eager)")
    parser.add_argument("--swap-repeats", type=int, default=50)
    parser.add_argument("--edit-repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma list of sections to leave out: train, inference")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke for the CPU check")
    args.steps = args.steps or (2 if args.smoke else 20)
    args.warmup = (0 if args.smoke else 3) if args.warmup is None else args.warmup
    args.compile_backend = args.compile_backend or ("aot_eager" if args.smoke else "inductor")
    args.precision = "bf16" if args.smoke else "fp16"  # fp16 autocast needs a GPU (adapterkit refuses it on CPU)
    if args.smoke:
        args.swap_repeats, args.edit_repeats = min(args.swap_repeats, 5), 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    skip = set(filter(None, args.skip.split(",")))
    result = {"benchmark": "gpu", "smoke": args.smoke, "machine": machine(),
              "settings": {k: v for k, v in vars(args).items() if k not in ("json", "skip")}}
    with tempfile.TemporaryDirectory(prefix="adapterkit-gpu-bench-") as workdir:
        base_dir = build_base(os.path.join(workdir, "base"), args.smoke)
        result["base_build_s"] = round(time.perf_counter() - started, 1)
        if "train" not in skip:
            full_finetune.register()
            try:
                result["train"] = train_rows(base_dir, workdir, args)
            finally:  # an AdapterBank sets up every registered method's swap: the baseline has none
                full_finetune.unregister()
        if "inference" not in skip:
            result.update(inference_sections(base_dir, args, workdir))
    result["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print_tables(result)
    return result


def print_tables(result: dict) -> None:
    if "train" in result:
        print()
        print_table(result["train"], ["method", "resolution", "batch_size", "optimizer", "peak_vram_gb", "vram_vs_full",
                                      "s_per_step", "steps_per_s_vs_full", "final_loss", "error"])
    if "swap" in result:
        print()
        print_table(result["swap"], ["method", "swap_ms", "adapter_params_m"])
        print()
        print_table([result["compile"]], ["backend", "edit_eager_s", "edit_compiled_s", "compiled_speedup", "first_compiled_edit_s", "recompiles"])
        print()
        print_table([result["mixed_batch"]], list(result["mixed_batch"]))
        print()
        print_table([result["cli_edit"]], list(result["cli_edit"]))


if __name__ == "__main__":
    main()
