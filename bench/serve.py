"""`adapterkit serve` under load: batching vs --max-batch 1, and resident memory over many requests.

    python bench/serve.py [--base builtin:tiny] [--requests 200] [--clients 16] [--steps 20] [--max-batch 16]
                          [--rss-requests 1000] [--smoke]

One run starts a real server per setting (a subprocess on 127.0.0.1), with four adapters (two LoRA, two Custom
Diffusion, from adapterkit.testing) on the base. 16 client threads send the requests, adapters mixed round robin
with the base and routing left out (each request names its adapter), seeds all different. For each setting:
throughput (requests/s, wall clock from the first request to the last answer), client-side latency p50/p95, and the
mean batch size the server reports. Then the batching server takes --rss-requests more requests (--rss-steps
steps each) and its resident memory is read (psutil) after a warm-up and at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

import requests  # noqa: E402
from common import emit, machine  # noqa: E402

from adapterkit.adapters import save_adapter  # noqa: E402
from adapterkit.base import load_base  # noqa: E402
from adapterkit.testing import random_custom_diffusion, random_image, random_lora  # noqa: E402

TASKS = ("derain", "cartoonize", "denoise", "lowlight")


def make_adapters(base_name: str, folder: str) -> list[str]:
    base = load_base(base_name)
    adapters = [random_lora(base, TASKS[0], rank=4, seed=1), random_lora(base, TASKS[1], rank=8, seed=2),
                random_custom_diffusion(base, TASKS[2], seed=3), random_custom_diffusion(base, TASKS[3], seed=4)]
    paths = []
    for adapter in adapters:
        paths.append(os.path.join(folder, adapter.task))
        save_adapter(adapter, paths[-1])
    return paths


class Server:
    """`adapterkit serve` in a subprocess on a free port; stopped on exit of the with-block."""

    def __init__(self, base: str, adapters: list[str], max_batch: int, batch_wait_ms: float, queue: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "adapterkit", "serve", "--base", base, "--port", str(self.port),
                        "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms), "--queue", str(queue),
                        "--device", "cpu", *sum((["--adapter", a] for a in adapters), [])]

    def __enter__(self):
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {' '.join(self.command)}")
            try:
                if requests.get(self.url + "/healthz", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                time.sleep(0.3)
        raise RuntimeError("server did not start within 300 s")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(30)

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def mean_batch(self) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("adapterkit_batch_size_")}
        return values["adapterkit_batch_size_sum"] / max(1.0, values["adapterkit_batch_size_count"])


def load(server: Server, n: int, clients: int, steps: int, image: bytes, seed0: int = 0) -> dict:
    """n requests from `clients` threads; wall time, latencies, status counts."""
    latencies, statuses, lock, counter = [], {}, threading.Lock(), iter(range(n))

    def client():
        session = requests.Session()
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            fields = {"instruction": f"{TASKS[i % 4]} the image", "adapter": TASKS[i % 4], "seed": str(seed0 + i), "steps": str(steps)}
            start = time.perf_counter()
            answer = session.post(server.url + "/v1/edit", files={"image": ("in.png", image, "image/png")}, data=fields, timeout=600)
            with lock:
                latencies.append(time.perf_counter() - start)
                statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {"requests": n, "wall_s": wall, "throughput_rps": n / wall, "p50_s": q[49], "p95_s": q[94], "statuses": statuses}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="builtin:tiny")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--rss-requests", type=int, default=1000)
    p.add_argument("--rss-steps", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a quick check that the bench runs: 32 requests, 2 steps, 64 for memory")
    args = p.parse_args()
    if args.smoke:
        args.requests, args.steps, args.rss_requests = 32, 2, 64
    buffer = io.BytesIO()
    random_image(0).save(buffer, format="PNG")  # 64 x 64, the tiny bases' resolution
    image = buffer.getvalue()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        adapters = make_adapters(args.base, workdir)
        result = {"machine": machine(), "settings": vars(args), "runs": {}}
        for max_batch in (args.max_batch, 1):
            with Server(args.base, adapters, max_batch, args.batch_wait_ms, queue=4 * args.clients) as server:
                load(server, args.clients, args.clients, args.steps, image, seed0=10_000)  # warm-up, not counted
                run = load(server, args.requests, args.clients, args.steps, image)
                run["mean_batch"] = server.mean_batch()
                result["runs"][f"max_batch={max_batch}"] = run
                rows.append({"server": f"--max-batch {max_batch}", **{k: run[k] for k in ("throughput_rps", "p50_s", "p95_s", "mean_batch")}})
                if max_batch != 1:
                    result["memory"] = memory_run(server, args, image)
        batched, single = result["runs"][f"max_batch={args.max_batch}"], result["runs"]["max_batch=1"]
        result["throughput_ratio"] = batched["throughput_rps"] / single["throughput_rps"]
        result["p95_ratio"] = batched["p95_s"] / single["p95_s"]
    emit(result, rows, ["server", "throughput_rps", "p50_s", "p95_s", "mean_batch"])
    m = result["memory"]
    print(f"\nbatching / max-batch 1: throughput x{result['throughput_ratio']:.2f}, p95 x{result['p95_ratio']:.2f}; "
          f"RSS {m['rss_start_mb']:.0f} -> {m['rss_end_mb']:.0f} MB over {m['requests']} requests (+{m['growth_mb']:.1f} MB)")


def memory_run(server: Server, args, image: bytes) -> dict:
    load(server, 2 * args.clients, args.clients, args.rss_steps, image, seed0=20_000)  # warm-up: allocator, caches
    start = server.rss_mb()
    run = load(server, args.rss_requests, args.clients, args.rss_steps, image, seed0=30_000)
    end = server.rss_mb()
    return {"requests": args.rss_requests, "steps": args.rss_steps, "rss_start_mb": start, "rss_end_mb": end,
            "growth_mb": end - start, "statuses": run["statuses"]}


if __name__ == "__main__":
    main()
