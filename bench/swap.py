"""Hot-swap vs reload: median time of an in-place adapter swap per method, of reloading the pipeline, and ratios.

    python bench/swap.py [--sizes tiny,sd15] [--repeats 20]

For each base size: a bank holds two Custom Diffusion adapters and two LoRA adapters (ranks 4 and 8, attn2 K/V);
a swap is `bank.activate(other task)` alternating between the two of one method. Reload is what a user without a
bank pays to switch tasks: `load_base(folder)` from disk plus loading the adapter folder into it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine, median_seconds, sd15_pipeline  # noqa: E402  (first: it sets the thread policy)

import torch  # noqa: E402

from adapterkit.adapters import load_adapter, save_adapter  # noqa: E402
from adapterkit.adapters.bank import AdapterBank  # noqa: E402
from adapterkit.base import load_base  # noqa: E402
from adapterkit.testing import random_custom_diffusion, random_lora  # noqa: E402


def save_base(size: str, folder: str) -> None:
    if size == "tiny":
        from adapterkit.tiny import save_tiny_pipeline

        save_tiny_pipeline(folder)
    else:
        sd15_pipeline().save_pretrained(folder)


def bench_size(size: str, repeats: int, workdir: str) -> list[dict]:
    base_dir = os.path.join(workdir, f"base-{size}")
    save_base(size, base_dir)
    base = load_base(base_dir)
    adapters = [
        random_custom_diffusion(base, "cd_a", seed=1), random_custom_diffusion(base, "cd_b", seed=2),
        random_lora(base, "lora_a", rank=4, seed=3), random_lora(base, "lora_b", rank=8, seed=4),
    ]
    folders = {}
    for adapter in adapters:
        folders[adapter.task] = save_adapter(adapter, os.path.join(workdir, f"{size}-{adapter.task}"))
    bank = AdapterBank(base)
    for adapter in adapters:
        bank.add(adapter)
    bank.prepare()

    def reload(task):
        def run():
            fresh = AdapterBank(load_base(base_dir))
            fresh.add(load_adapter(folders[task]))
            fresh.activate(task)
        return run

    reload_s = {m: median_seconds(reload(t), repeats=3 if size == "sd15" else 5) for m, t in (("custom-diffusion", "cd_a"), ("lora", "lora_a"))}
    rows = []
    for method, (a, b) in (("custom-diffusion", ("cd_a", "cd_b")), ("lora", ("lora_a", "lora_b"))):
        state = {"next": a}

        def swap():
            bank.activate(state["next"])
            state["next"] = b if state["next"] == a else a

        swap_s = median_seconds(swap, repeats=repeats, warmup=2)
        rows.append({
            "base": size, "method": method, "swap_ms": swap_s * 1e3, "reload_s": reload_s[method],
            "reload_over_swap": reload_s[method] / swap_s,
            "unet_params_M": sum(p.numel() for p in base.unet.parameters()) / 1e6,
            "adapter_params_M": sum(v.numel() for v in bank.get(a).tensors.values()) / 1e6,
        })
    del bank, base
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,sd15", help="Comma-separated: tiny, sd15.")
    parser.add_argument("--repeats", type=int, default=20, help="Swaps timed per method (median reported).")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for size in args.sizes.split(","):
            rows += bench_size(size.strip(), args.repeats, workdir)
    emit({"benchmark": "swap", "machine": machine(), "results": rows}, rows,
         ["base", "method", "swap_ms", "reload_s", "reload_over_swap", "adapter_params_M"])


if __name__ == "__main__":
    main()
