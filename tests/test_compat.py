"""compat.py's workarounds: upstream notices kept off the terminal (set ADAPTERKIT_VERBOSE=1 to see them)."""

from __future__ import annotations

import os
import subprocess
import sys

IMPORTS = "import adapterkit, bitsandbytes"


def _stderr(extra_env: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "ADAPTERKIT_VERBOSE"} | {"HF_HUB_OFFLINE": "1", **extra_env}
    return subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, env=env, timeout=120).stderr


def _cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


def test_bitsandbytes_import_prints_nothing_on_cpus_with_avx512_bf16():
    """bitsandbytes 0.50 fetches a hub kernel at import on AVX512-BF16 CPUs; offline, `kernels` (required by
    transformers 5.25) logged "Skipping publisher trust check ..." on stderr, which broke every CLI error line."""
    assert _stderr({}) == ""
    if _cpu_has_avx512_bf16():  # the notice is real here: verbose mode shows it
        assert "kernels-community/quantization-bitsandbytes" in _stderr({"ADAPTERKIT_VERBOSE": "1"})
