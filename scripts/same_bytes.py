"""Write a fixed-seed set of adapters (train CD + LoRA, then merges) so two versions of adapterkit can be compared
byte for byte: run it with each version on PYTHONPATH into two folders, then `--compare A B`.

    PYTHONPATH=/path/to/old python scripts/same_bytes.py --data /tmp/sb-data --output /tmp/sb-old
    PYTHONPATH=/path/to/new python scripts/same_bytes.py --data /tmp/sb-data --output /tmp/sb-new
    python scripts/same_bytes.py --compare /tmp/sb-old /tmp/sb-new

The dataset folder is written on the first run and reused, so both versions read the same files. Weight files,
validation images and model cards must be identical; adapter.json and trainer_state.json are compared with the
fields that legitimately differ between runs removed (timings, the package version).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import sys

VOLATILE = {"time_s", "adapterkit_version", "images_per_second"}  # timings, throughput, package version


def write(data: str, output: str) -> None:
    from adapterkit import merge, train
    from adapterkit.train import TrainConfig

    if not os.path.isdir(data):
        from adapterkit.demo.tasks import write_task_dataset

        write_task_dataset(["derain", "cartoonize"], data, n=12, seed=0, resolution=64, quiet=True)
    common = dict(base="builtin:tiny", data=data, steps=8, batch_size=2, validation_steps=4, validation_rows=2,
                  validation_inference_steps=2, checkpoint_steps=4, quiet=True, seed=3, log_with="none")
    cd = train(TrainConfig(method="custom-diffusion", task="derain", data_task="derain", output=os.path.join(output, "cd"), **common))
    lo = train(TrainConfig(method="lora", task="cartoonize", data_task="cartoonize", rank=4, cache_latents=True,
                           output=os.path.join(output, "lora"), **common))
    merge([cd.path, lo.path], "builtin:tiny", "lsq-soft", output=os.path.join(output, "merged-lsq-soft"), quiet=True)
    merge([cd.path, lo.path], "builtin:tiny", "linear", output=os.path.join(output, "merged-linear-lora"), as_lora=True, quiet=True)
    merge([cd.path, lo.path], "builtin:tiny", "svd", rank=2, output=os.path.join(output, "merged-svd"), quiet=True)


def _strip(value, root: str):
    """Drop VOLATILE fields; write the output folder as <root> (the two runs write to different folders)."""
    if isinstance(value, dict):
        return {k: _strip(v, root) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v, root) for v in value]
    return value.replace(root, "<root>") if isinstance(value, str) else value


def compare(a: str, b: str) -> int:
    different = 0
    files = sorted({os.path.relpath(os.path.join(r, f), a) for r, _, fs in os.walk(a) for f in fs})
    others = sorted({os.path.relpath(os.path.join(r, f), b) for r, _, fs in os.walk(b) for f in fs})
    if files != others:
        print("file lists differ:", sorted(set(files) ^ set(others)))
        different += 1
    for rel in files:
        pa, pb = os.path.join(a, rel), os.path.join(b, rel)
        if not os.path.isfile(pb) or rel.endswith((".bin", ".pkl", ".pt")) and "checkpoints" in rel:
            continue  # accelerate's optimizer/RNG pickles: compared through the adapter they resume into
        if rel.endswith(".json") or rel.endswith(".jsonl"):
            same = _load(pa, a) == _load(pb, b)
        elif rel.endswith("README.md"):
            same = _card(pa) == _card(pb)
        else:
            same = filecmp.cmp(pa, pb, shallow=False)
        print(("same      " if same else "DIFFERENT ") + rel)
        different += not same
    print(f"{len(files)} files, {different} different")
    return 1 if different else 0


def _load(path: str, root: str):
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return [_strip(json.loads(line), root) for line in f if line.strip()]
        return _strip(json.load(f), root)


def _card(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")
    parser.add_argument("--output")
    parser.add_argument("--compare", nargs=2)
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    write(args.data, args.output)
