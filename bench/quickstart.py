"""The README's quick-start walk-through, run end to end as a new user would (issue 18).

    python bench/quickstart.py                  # the block as written (~5-10 min on 2 idle cores)
    python bench/quickstart.py --smoke          # every command with tiny sizes (--rows 8, --steps 2): ~1-2 min
    python bench/quickstart.py --keep DIR       # run in DIR and keep what it wrote (default: a temporary folder)

Reads the shell block that follows the `walkthrough` marker in README.md, runs each `adapterkit ...` line with
bash in a fresh folder (the CLI as installed, default options as written), and times each command. Then reads
the eval's report.json: per task the base's, the adapter's and the merge's PSNR, the adapter's gain over the base
with its 95% interval, and the merge's retention (or why it is n/a). Issue 18's bar: every adapter trained with
nothing but --base/--data/--method/--task/--output gains >= 2 dB, each in under 5 minutes on 2 idle cores.
Prints JSON (with the machine and its load average), then a table. Timings taken on a loaded machine are not
figures: compare them only with a load average near the core count or below.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/common.py

from common import emit, machine  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
MARKER = "<!-- walkthrough"
# --smoke: appended to each command (click keeps an option's last value), so the block's own flags are overridden.
SMOKE = {"demo-data": ["--rows", "8"], "train": ["--steps", "2", "--validation-steps", "0"],
         "eval": ["--steps", "2", "--limit", "2"], "edit": ["--steps", "2"]}
GAIN_BAR_DB = 2.0


def walkthrough_commands(readme: str = README) -> list[str]:
    """The `adapterkit ...` lines of the first ```bash block after the walkthrough marker, `\\` continuations joined."""
    text = open(readme, encoding="utf-8").read()
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    if block is None:
        raise SystemExit(f"no ```bash block after {MARKER} in {readme}")
    joined = block.group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip().startswith("adapterkit ")]


def smoke_args(command: str) -> list[str]:
    return SMOKE.get(shlex.split(command)[1], [])


def run_block(commands: list[str], folder: str, smoke: bool) -> list[dict]:
    """Run each command in `folder`; stop at the first failure. Returns one record per command run."""
    records = []
    for command in commands:
        line = command + "".join(f" {shlex.quote(a)}" for a in (smoke_args(command) if smoke else []))
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", line], cwd=folder, capture_output=True, text=True)
        records.append({"command": line, "seconds": round(time.perf_counter() - started, 1), "exit_code": done.returncode,
                        "stdout": done.stdout, "stderr_tail": done.stderr[-2000:]})
        print(f"[{records[-1]['seconds']:7.1f} s] exit {done.returncode}: {line}", file=sys.stderr)
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            break
    return records


def figures(folder: str, records: list[dict]) -> list[dict]:
    """Per task of every report.json the block wrote: base / adapter / merge PSNR, gain with interval, retention."""
    rows = []
    for record in records:
        parts = shlex.split(record["command"])
        if parts[1] != "eval" or record["exit_code"] != 0:
            continue
        report = json.load(open(os.path.join(folder, parts[parts.index("--output") + 1], "report.json")))
        for task, section in report["tasks"].items():
            psnr = {c: section["metrics"][c]["psnr"]["mean"] for c in section["columns"]}
            adapter = next((c for c in section["columns"] if c not in ("base",) and c not in section["merges"]), None)
            row = {"task": task, "base": psnr["base"], "adapter": adapter, "adapter_psnr": psnr.get(adapter)}
            for merge, view in section["merges"].items():
                gain = view.get("adapter_gain") or {}
                row.update(merge=merge, merge_psnr=psnr[merge], gain_db=view.get("adapter_gain_db"),
                           gain_ci95=gain.get("ci95"), retention=view["psnr_retention"], retention_note=view.get("note"))
            if "gain_db" not in row and adapter is not None:
                row["gain_db"] = psnr[adapter] - psnr["base"]
            row["train_seconds"] = _train_seconds(records, adapter)
            row["meets_bar"] = row.get("gain_db") is not None and row["gain_db"] >= GAIN_BAR_DB
            rows.append(row)
    return rows


def _train_seconds(records: list[dict], adapter_column: str | None) -> float | None:
    for record in records:
        parts = shlex.split(record["command"])
        if parts[1] == "train" and os.path.basename(parts[parts.index("--output") + 1].rstrip("/")) == adapter_column:
            return record["seconds"]
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the block runs, not its figures")
    parser.add_argument("--keep", default=None, help="folder to run in and keep (default: a temporary folder)")
    args = parser.parse_args()
    commands = walkthrough_commands()
    folder = args.keep or tempfile.mkdtemp(prefix="adapterkit-quickstart-")
    os.makedirs(folder, exist_ok=True)
    started = time.perf_counter()
    records = run_block(commands, folder, args.smoke)
    rows = figures(folder, records)
    result = {"bench": "quickstart", "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "smoke": args.smoke, "folder": folder, "seconds": round(time.perf_counter() - started, 1),
              "all_ran": len(records) == len(commands) and all(r["exit_code"] == 0 for r in records),
              "commands": [{k: r[k] for k in ("command", "seconds", "exit_code")} for r in records],
              "printed": {r["command"]: r["stdout"] for r in records}, "tasks": rows}
    emit(result, rows, ["task", "adapter", "base", "adapter_psnr", "gain_db", "gain_ci95", "train_seconds", "merge",
                        "merge_psnr", "retention", "meets_bar"])
    sys.exit(0 if result["all_ran"] else 1)


if __name__ == "__main__":
    main()
