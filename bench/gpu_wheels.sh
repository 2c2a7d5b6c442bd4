#!/usr/bin/env bash
# Wheels for bench/gpu.py on a GPU machine without network whose image already holds torch, transformers, peft,
# accelerate, safetensors, numpy, pandas, pyarrow, fsspec, xxhash, huggingface-hub (the device image of
# /work/.library/device): diffusers, bitsandbytes, datasets and the packages they need that the image lacks.
# Versions are the ones adapterkit is tested with here.
#
#   bash bench/gpu_wheels.sh [FOLDER]        # default .whl/ (git-ignored), ~40 MB
# then, on the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=$PWD:/tmp/site python3 bench/gpu.py --json gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
mkdir -p "$out"
packages=(
  diffusers==0.42.1 bitsandbytes==0.50.2 datasets==5.2.0
  importlib_metadata==8.7.0               # diffusers (zipp, its need, is in the image)
  dill==0.4.0 multiprocess==0.70.18       # datasets
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$out" "${packages[@]}"
# bitsandbytes ships a library per CUDA / ROCm / XPU version (40 MB); the device's torch is built for CUDA 13:
# keep the CPU and CUDA 13.x libraries (RECORD rewritten to match), so wheels and repository fit the 64 MiB limit.
python3 - "$out"/bitsandbytes-*.whl <<'PY'
import re, sys, zipfile, os
path = sys.argv[1]
keep = lambda name: not re.search(r"libbitsandbytes_(cuda1[0-2]\d|rocm|xpu)", name)
slim = path + ".slim"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if not keep(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if keep(l.split(",")[0])).encode()
        dst.writestr(info, data)
os.replace(slim, path)
PY
du -sh "$out"
ls "$out"
