"""Peak memory of the whole `adapterkit train` process at SD1.5 scale: Custom Diffusion vs LoRA, two settings.

Each run is the real command (`python -m adapterkit train ...`, so text encoder + VAE + UNet, data loading, the
casting of frozen weights, the optimizer, the final save) in its own process; its peak RSS is the kernel's
`ru_maxrss` of that process (os.wait4), not a sample. Settings, batch 1, 8-bit AdamW:

    256-fp32      256 px, fp32
    512-bf16-gc   512 px, --mixed-precision bf16 (frozen weights cast to bf16) + --gradient-checkpointing

The base is SD1.5-shaped with random weights (UNet 859.5M parameters, CLIP ViT-L/14-sized text encoder, SD VAE;
bench/common.sd15_pipeline), written once to WORKDIR (4.3 GB; reused with --workdir).

    OMP_NUM_THREADS=1 python bench/train_memory.py --workdir /tmp/tm      # 4 runs, 2 steps each
    python bench/train_memory.py --size tiny --steps 1                   # a smoke run on a tiny base (seconds)

Prints JSON (machine, settings, each run's peak RSS, step times, final loss) and a table. Step times are only
worth comparing on an idle machine; peak RSS does not depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {
    "256-fp32": {"resolution": 256, "flags": ["--mixed-precision", "no"]},
    "512-bf16-gc": {"resolution": 512, "flags": ["--mixed-precision", "bf16", "--gradient-checkpointing"]},
}
METHODS = ("custom-diffusion", "lora")


def build_base(size: str, folder: str) -> str:
    """Write the base once (in a child process, so this process never holds 4 GB of weights)."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return folder
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from common import sd15_pipeline; sd15_pipeline().save_pretrained(sys.argv[2])"
        if size == "sd15" else
        "import sys; from adapterkit.tiny import save_tiny_pipeline; save_tiny_pipeline(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, os.path.dirname(os.path.abspath(__file__)), folder], check=True)
    return folder


def build_data(folder: str, resolution: int, rows: int) -> str:
    from adapterkit.testing import make_edit_dataset

    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        make_edit_dataset(folder, rows, size=resolution)
    return folder


def run_train(base: str, data: str, method: str, setting: str, resolution: int, steps: int, output: str) -> dict:
    """One `adapterkit train` process; returns its peak RSS (ru_maxrss), wall time, step times and final loss."""
    command = [
        sys.executable, "-m", "adapterkit", "train", "--base", base, "--data", data, "--method", method, "--task", "bench",
        "--output", output, "--resolution", str(resolution), "--steps", str(steps), "--batch-size", "1",
        "--optimizer", "adamw8bit", "--validation-steps", "0", "--checkpoint-steps", "0", "--log-with", "none", "--quiet",
        *SETTINGS[setting]["flags"],
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    row = {"method": method, "setting": setting, "resolution": resolution, "steps": steps,
           "wall_s": round(time.perf_counter() - started, 1),
           "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}  # Linux: ru_maxrss in KiB
    if process.returncode != 0:
        return {**row, "error": text.strip().splitlines()[-1:] or [f"exit {process.returncode}"]}
    with open(os.path.join(output, "logs", "train_log.jsonl")) as f:
        step_s = [round(1 / json.loads(line)["images_per_second"], 2) for line in f]  # batch 1: seconds per step
    with open(os.path.join(output, "adapter.json")) as f:
        training = json.load(f)["training"]
    return {**row, "step_s": step_s, "final_loss": training["final_loss"], "mixed_precision": training["mixed_precision"],
            "gradient_checkpointing": training["gradient_checkpointing"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("sd15", "tiny"), default="sd15", help="SD1.5-shaped base, or the tiny one (smoke)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per run (the peak is reached in step 1)")
    parser.add_argument("--rows", type=int, default=4, help="dataset rows")
    parser.add_argument("--workdir", default=None, help="keep the base and data here (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="train-memory-")
    os.makedirs(workdir, exist_ok=True)
    try:
        base = build_base(args.size, os.path.join(workdir, f"base-{args.size}"))
        rows = []
        for setting in args.settings.split(","):
            resolution = SETTINGS[setting]["resolution"] if args.size == "sd15" else 32
            data = build_data(os.path.join(workdir, f"data-{resolution}"), resolution, args.rows)
            for method in args.methods.split(","):
                output = os.path.join(workdir, f"out-{setting}-{method}")
                shutil.rmtree(output, ignore_errors=True)
                rows.append(run_train(base, data, method, setting, resolution, args.steps, output))
                print(f"  {method} {setting}: peak {rows[-1]['peak_rss_gb']} GB, {rows[-1]['wall_s']} s", file=sys.stderr)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    for row in rows:
        if "step_s" in row:
            row["last_step_s"] = row["step_s"][-1]
    result = {"benchmark": "train_memory", "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "base": args.size, "batch_size": 1, "optimizer": "adamw8bit", "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    emit(result, rows, ["method", "setting", "peak_rss_gb", "last_step_s", "wall_s", "final_loss", "error"])


if __name__ == "__main__":
    main()
