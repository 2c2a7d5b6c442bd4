"""AdapterBank under load: many threads, random activate/edit calls, exact outputs, flat memory (issue 7)."""

from __future__ import annotations

import random
import threading

import numpy as np
from adapterkit.testing import random_custom_diffusion, random_image, random_lora

from adapterkit.adapters.bank import AdapterBank

GEN = dict(steps=1, output_type="np")
SEEDS = (0, 1, 2)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_200_calls_from_4_threads_give_single_adapter_outputs_and_memory_stays_flat(tiny_base):
    bank = AdapterBank(tiny_base)
    adapters = [
        random_custom_diffusion(tiny_base, "cd1", seed=1), random_custom_diffusion(tiny_base, "cd2", seed=2),
        random_lora(tiny_base, "lo1", rank=2, seed=3), random_lora(tiny_base, "lo2", rank=4, seed=4),
        random_lora(tiny_base, "lo3", rank=3, seed=5, targets="attn"),
    ]
    for adapter in adapters:
        bank.add(adapter)
    image = random_image(0, size=32)
    tasks = [a.task for a in adapters] + [None]
    expected = {(t, s): bank.edit(image, "x", task=t, seed=s, **GEN) for t in tasks for s in SEEDS}
    assert len({v.tobytes() for v in expected.values()}) == len(expected)  # every (task, seed) differs

    mismatches, errors = [], []

    def worker(worker_id: int, calls: int):
        rng = random.Random(worker_id)
        try:
            for _ in range(calls):
                task, seed = rng.choice(tasks), rng.choice(SEEDS)
                if rng.random() < 0.3:
                    bank.activate(task)  # a bare swap racing the other threads' edits
                    continue
                out = bank.edit(image, "x", task=task, seed=seed, **GEN)
                if not np.array_equal(out, expected[(task, seed)]):
                    mismatches.append((task, seed))
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    def run_round(calls_per_thread: int):
        threads = [threading.Thread(target=worker, args=(i, calls_per_thread)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    run_round(50)  # warm-up: 200 calls
    warm = rss_mb()
    run_round(50)  # measured: 200 more calls
    grown = rss_mb() - warm
    assert not errors, errors[:3]
    assert not mismatches, mismatches[:5]
    assert grown < 25, f"resident memory grew {grown:.1f} MB over 200 calls after warm-up"
