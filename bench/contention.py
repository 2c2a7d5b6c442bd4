"""CPU contention: each workload idle, then again with one other CPU-bound process on the machine; the ratio.

    python bench/contention.py                              # adapterkit demo and bench/swap.py, both ways (~10 min on 2 cores)
    python bench/contention.py --quick                      # demo --train-steps 2, swap.py on the tiny base (~3 min)
    python bench/contention.py --policies PASSIVE,ACTIVE    # also the spinning OpenMP setting, for comparison

Each workload runs as its own process with the caller's environment minus OMP_NUM_THREADS / MKL_NUM_THREADS (so
torch picks its default thread count, as for a user) and with OMP_WAIT_POLICY set to each policy in turn (PASSIVE
is what adapterkit's CLI and benchmarks set: adapterkit/threads.py). The competitor is one single-threaded busy
loop (`--competitor python`), or a torch matrix-product loop with torch's default threads and OpenMP settings
(`--competitor torch`, like another ML job). Target: contended / idle <= 2.5. Needs an otherwise idle machine: the
1-minute load average is recorded before each idle run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPETITORS = {
    "python": "while True: pass",
    "torch": "import torch\na = torch.randn(1024, 1024)\nwhile True: a @ a",
}


def workload_command(name: str, quick: bool, workdir: str) -> list[str]:
    if name == "demo":
        extra = ["--train-steps", "2"] if quick else []
        return [sys.executable, "-m", "adapterkit", "demo", "--output", os.path.join(workdir, "demo"), "--quiet", *extra]
    if name == "swap":
        extra = ["--sizes", "tiny", "--repeats", "10"] if quick else []
        return [sys.executable, os.path.join(REPO, "bench", "swap.py"), *extra]
    raise SystemExit(f"unknown workload {name}; use demo, swap")


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return seconds, done.stdout


def swap_figures(stdout: str) -> dict:
    """bench/swap.py prints its JSON first: {base/method: swap_ms}."""
    start, end = stdout.index("{"), stdout.rindex("}")
    while True:  # the JSON object ends at the last "}" before the table
        try:
            result = json.loads(stdout[start:end + 1])
            break
        except json.JSONDecodeError:
            end = stdout.rindex("}", 0, end)
    return {f"{r['base']}/{r['method']}": r["swap_ms"] for r in result["results"]}


def measure(name: str, policy: str, competitor: str, quick: bool, workdir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(OMP_WAIT_POLICY=policy, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    command = workload_command(name, quick, workdir)
    load = os.getloadavg()[0]
    idle_s, idle_out = timed(command, env)
    rival = subprocess.Popen([sys.executable, "-c", COMPETITORS[competitor]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the competitor is running before the workload starts
        busy_s, busy_out = timed(command, env)
    finally:
        rival.kill()
        rival.wait()
    row = {"workload": name, "policy": policy, "competitor": competitor, "load_before_idle_run": round(load, 2),
           "idle_s": round(idle_s, 2), "contended_s": round(busy_s, 2), "ratio": round(busy_s / idle_s, 2)}
    if name == "swap":
        idle_ms, busy_ms = swap_figures(idle_out), swap_figures(busy_out)
        row["swap_ms_idle"] = {k: round(v, 3) for k, v in idle_ms.items()}
        row["swap_ms_contended"] = {k: round(v, 3) for k, v in busy_ms.items()}
        row["swap_ratio_max"] = round(max(busy_ms[k] / idle_ms[k] for k in idle_ms), 2)
    print(f"  {name} {policy}: idle {idle_s:.1f} s, with a {competitor} competitor {busy_s:.1f} s ({busy_s / idle_s:.2f}x)", file=sys.stderr)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="demo,swap", help="comma list: demo, swap")
    parser.add_argument("--policies", default="PASSIVE", help="comma list of OMP_WAIT_POLICY values to measure")
    parser.add_argument("--competitor", choices=sorted(COMPETITORS), default="python")
    parser.add_argument("--quick", action="store_true", help="short workloads: a check that the bench runs")
    parser.add_argument("--json", default=None, help="also write the JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for policy in args.policies.split(","):
            for name in args.workloads.split(","):
                rows.append(measure(name.strip(), policy.strip(), args.competitor, args.quick, workdir))
    result = {"benchmark": "contention", "machine": machine(), "quick": args.quick, "target_ratio": 2.5, "results": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    emit(result, rows, ["workload", "policy", "competitor", "idle_s", "contended_s", "ratio", "swap_ratio_max", "load_before_idle_run"])


if __name__ == "__main__":
    main()
