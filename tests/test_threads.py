"""adapterkit/threads.py: the CLI sets OMP_WAIT_POLICY=PASSIVE before any command loads torch, and a user's own
setting wins (issue 16: OpenMP threads spinning on shared cores made a run 10x slower)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import os, sys\n"
    "from click.testing import CliRunner\n"
    "from adapterkit.cli import main\n"
    "assert 'torch' not in sys.modules\n"
    "result = CliRunner().invoke(main, ['demo-data', '--help'])\n"
    "assert result.exit_code == 0, result.output\n"
    "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)\n"
)


def _probe(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], env={**clean, "PYTHONPATH": REPO, **env}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


def test_cli_sets_passive_wait_policy_before_torch_loads():
    assert _probe() == ["PASSIVE", "False"]  # set, and torch (which reads it once, when it loads libgomp) not yet loaded


def test_a_users_wait_policy_wins():
    assert _probe(OMP_WAIT_POLICY="ACTIVE")[0] == "ACTIVE"


def test_configure_threads_reports_when_torch_came_first(monkeypatch):
    import torch  # noqa: F401  (already imported by conftest: libgomp has read its settings)

    from adapterkit.threads import configure_threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert configure_threads() == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "effective": False}
