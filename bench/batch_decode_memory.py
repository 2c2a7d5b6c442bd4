"""What a batched edit's VAE costs: decoding a batch at once vs one image at a time (adapters/batch_edit.py).

    python bench/batch_decode_memory.py                  # SD1.5's VAE, 512 px, batch 8 (~5 min on 2 CPU cores)
    python bench/batch_decode_memory.py --resolution 256 --batch 4    # quicker

Each configuration runs in its own process (an SD1.5-sized AutoencoderKL with random weights, decoding random
latents), so its peak RSS rise is its own: one image; the batch decoded at once (diffusers' default); the batch
with `use_slicing` on, as `AdapterBank.edit_batch` (and through it `edit --jobs`, `serve` and `eval`) runs it.
On a GPU the activations are the same shapes (half the bytes in fp16). Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine  # noqa: E402  (first: it sets the OpenMP wait policy before torch loads)

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[4])
from common import sd15_vae
import torch
vae = sd15_vae(seed=0).eval()
batch, side, sliced = int(sys.argv[1]), int(sys.argv[2]) // 8, sys.argv[3] == "1"
vae.use_slicing = sliced
latents = torch.randn(batch, 4, side, side)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    vae.decode(latents)
seconds = time.perf_counter() - start
rise = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"seconds": seconds, "peak_rss_rise_mb": rise}))
"""


def measure(batch: int, resolution: int, sliced: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(batch), str(resolution), "1" if sliced else "0",
                          os.path.dirname(os.path.abspath(__file__))], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: side / 8)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    args = parser.parse_args(argv)
    configs = {"one image": (1, False), f"batch {args.batch} at once": (args.batch, False),
               f"batch {args.batch}, one image at a time": (args.batch, True)}
    rows = []
    for label, (batch, sliced) in configs.items():
        figures = measure(batch, args.resolution, sliced)
        rows.append({"decode": label, "seconds": round(figures["seconds"], 1),
                     "peak_rss_rise_mb": round(figures["peak_rss_rise_mb"])})
    result = {"bench": "batch_decode_memory", "machine": machine(), "vae": "SD1.5-sized AutoencoderKL, random weights",
              "resolution": args.resolution, "rows": rows}
    emit(result, rows, ["decode", "seconds", "peak_rss_rise_mb"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
