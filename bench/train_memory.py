"""Training memory and speed: full fine-tuning vs Custom Diffusion (attn2 K/V) vs LoRA, with AdamW8bit and AdamW.

An SD1.5-sized 8-channel IP2P UNet with random weights (859.5M parameters), CPU, fp32, batch 1, UNet alone
(latents, image condition and text features are random tensors of the real shapes; the VAE and text encoder are
frozen in training and excluded here). Each configuration runs in its own process so its peak RSS is its own;
the loss, optimizers and trainable-parameter selection are adapterkit's (train.loop.ip2p_loss / make_optimizer,
adapters.*.make_trainable).

    python bench/train_memory.py                   # all 6 configurations, 256px, 3 steps
    python bench/train_memory.py --resolution 128 --steps 2 --only lora,custom-diffusion

Prints one JSON object (machine, settings, results, ratios to full fine-tuning with the same optimizer) and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

METHODS = ("full", "custom-diffusion", "lora")
OPTIMIZERS = ("adamw8bit", "adamw")
SD15_UNET = dict(
    in_channels=8, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
)


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def worker(method: str, optimizer_name: str, resolution: int, steps: int, rank: int) -> dict:
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from adapterkit.adapters import get_method
    from adapterkit.train.batches import seeded_generator
    from adapterkit.train.loop import ip2p_loss
    from adapterkit.train.setup import make_optimizer

    torch.manual_seed(0)
    latent = resolution // 8
    unet = UNet2DConditionModel(sample_size=latent, **SD15_UNET)
    unet.train()
    model_gb = _rss_gb()
    if method == "full":
        unet.requires_grad_(True)
        params = list(unet.parameters())
    else:  # an adapter method, through the method protocol
        adapter = get_method(method)
        params = adapter.make_trainable(unet, adapter.training_options({"rank": rank, "lora_alpha": None, "targets": "kv"}))
    optimizer = make_optimizer(params, optimizer_name, 1e-5)
    noise_scheduler = DDPMScheduler()
    null_text = torch.zeros(1, 77, 768)
    times = []
    for step in range(steps):
        gen = seeded_generator(0, "bench", step)
        latents = torch.randn(1, 4, latent, latent, generator=gen)
        cond = torch.randn(1, 4, latent, latent, generator=gen)
        text = torch.randn(1, 77, 768, generator=gen)
        started = time.perf_counter()
        loss = ip2p_loss(unet, noise_scheduler, latents, cond, text, null_text, gen, 0.05)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return {
        "method": method,
        "optimizer": optimizer_name,
        "unet_params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "trainable_params_m": round(sum(p.numel() for p in params) / 1e6, 3),
        "optimizer_state_mb": round(state_bytes / 1e6, 1),
        "model_rss_gb": round(model_gb, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
        "step_s": [round(t, 2) for t in times],
        "median_step_s": round(statistics.median(times), 2),
        "final_loss": round(float(loss), 4),
    }


def _needed_gb(method: str, optimizer_name: str) -> float:
    """Rough peak for a go/no-go check: fp32 weights (3.4 GB) + grads + optimizer states + activations."""
    if method != "full":
        return 7.0
    return 3.44 * (2 + (0.5 if optimizer_name == "adamw8bit" else 2)) + 4.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank")
    parser.add_argument("--only", default=",".join(METHODS), help="comma list of methods (full, custom-diffusion, lora)")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--json", default=None, help="also write the JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        print(json.dumps(worker(*args.worker, args.resolution, args.steps, args.rank)))
        return

    import psutil
    import torch

    results = []
    for method in args.only.split(","):
        for optimizer_name in args.optimizers.split(","):
            available = psutil.virtual_memory().available / 1e9
            if available < _needed_gb(method, optimizer_name):
                results.append({"method": method, "optimizer": optimizer_name, "skipped": f"needs ~{_needed_gb(method, optimizer_name):.0f} GB, {available:.1f} GB free"})
                continue
            command = [sys.executable, __file__, "--worker", method, optimizer_name, "--resolution", str(args.resolution),
                       "--steps", str(args.steps), "--rank", str(args.rank)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                results.append({"method": method, "optimizer": optimizer_name, "error": done.stderr.strip().splitlines()[-1:]})
                continue
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {method:17s} {optimizer_name:10s} done: {results[-1]['median_step_s']} s/step, peak {results[-1]['peak_rss_gb']} GB", file=sys.stderr)
    full = {r["optimizer"]: r for r in results if r["method"] == "full" and "peak_rss_gb" in r}
    for r in results:
        ref = full.get(r["optimizer"])
        if ref and "peak_rss_gb" in r:
            r["peak_vs_full"] = round(r["peak_rss_gb"] / ref["peak_rss_gb"], 3)
            r["step_time_vs_full"] = round(r["median_step_s"] / ref["median_step_s"], 3)
    import bitsandbytes

    report = {
        "benchmark": "train_memory",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                    "total_ram_gb": round(psutil.virtual_memory().total / 1e9, 1)},
        "settings": {"resolution": args.resolution, "steps": args.steps, "batch_size": 1, "dtype": "float32",
                     "device": "cpu", "lora_rank": args.rank, "lora_targets": "attn2 to_k, to_v", "unet": "SD1.5 shape, 8 input channels"},
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\n{'method':17s} {'optimizer':10s} {'trainable M':>11s} {'opt state MB':>12s} {'peak GB':>8s} {'x full':>7s} {'s/step':>7s} {'x full':>7s}")
    for r in results:
        if "peak_rss_gb" not in r:
            print(f"{r['method']:17s} {r['optimizer']:10s} {r.get('skipped') or r.get('error')}")
            continue
        print(f"{r['method']:17s} {r['optimizer']:10s} {r['trainable_params_m']:11.3f} {r['optimizer_state_mb']:12.1f} "
              f"{r['peak_rss_gb']:8.2f} {r.get('peak_vs_full', float('nan')):7.3f} {r['median_step_s']:7.2f} {r.get('step_time_vs_full', float('nan')):7.3f}")


if __name__ == "__main__":
    main()
