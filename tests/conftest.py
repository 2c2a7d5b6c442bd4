"""Shared fixtures: a tiny IP2P base saved once per session, loaded fresh per test; HF hub kept offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from adapterkit.adapters import method_names  # noqa: E402  (the registry: names only, no torch)

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(params=method_names())
def method(request) -> str:
    """Each built-in adapter method, from the registry: a test that takes `method` runs once per method, so every
    method goes through the same matrix (peft's habit). A new built-in method joins every such test."""
    return request.param


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> str:
    """A tiny random IP2P pipeline as a diffusers folder (what `adapterkit make-tiny-base` writes)."""
    from adapterkit.tiny import save_tiny_pipeline

    return save_tiny_pipeline(str(tmp_path_factory.mktemp("bases") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def trainable_base_dir(tmp_path_factory) -> str:
    """The tiny base training tests use (adapterkit.testing.make_trainable_tiny_base), saved once per session."""
    from adapterkit.testing import make_trainable_tiny_base

    return make_trainable_tiny_base(tmp_path_factory.mktemp("bases") / "trainable")


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One merge feature cache for the session's tests, outside the user's home (merge modules use it as pytestmark)."""
    path = str(tmp_path_factory.getbasetemp() / "adapterkit-cache")
    previous = os.environ.get("ADAPTERKIT_CACHE")
    os.environ["ADAPTERKIT_CACHE"] = path
    yield path
    if previous is None:
        os.environ.pop("ADAPTERKIT_CACHE", None)
    else:
        os.environ["ADAPTERKIT_CACHE"] = previous


# builtin:tiny v1 (text width 32), bundled until issue 12's v2 replaced it: the merge diagnostics' tests are calibrated
# on its narrow text encoder (rows near and at the width, the exact merge's refusal), which v2's width 256 no longer hits.
TINY_V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_base_v1")


@pytest.fixture(scope="module")
def tiny_v1():
    """builtin:tiny v1 from tests/data (the merge diagnostics are calibrated on it)."""
    from adapterkit.base import load_base

    return load_base(TINY_V1)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models gain nothing from a second one, and on shared CI cores two
    threads run ~3x slower (OpenMP waits on descheduled threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_base(tiny_base_dir):
    """A freshly loaded tiny base (tests may change its weights)."""
    from adapterkit.base import load_base

    return load_base(tiny_base_dir)


@pytest.fixture
def image():
    from adapterkit.testing import random_image

    return random_image(0)


SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "prometheus_client")


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_base_dir):
    """A real `adapterkit serve` process on 127.0.0.1 at a free port (tests/test_serve*.py): the tiny base, LoRA
    adapters derain (r=2) and cartoonize (r=4) from --adapter and a Custom Diffusion adapter denoise from
    --adapter-dir; small limits (batch 4, queue 6, 0.25 MB bodies) so each refusal is cheap to provoke."""
    import importlib.util

    missing = [m for m in SERVE_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the [serve] extra is not installed ({', '.join(missing)} missing): pip install -e '.[serve]'")
    import socket
    import subprocess
    import sys
    import time

    import requests

    from adapterkit.adapters import save_adapter
    from adapterkit.base import load_base
    from adapterkit.testing import random_custom_diffusion, random_lora

    root = tmp_path_factory.mktemp("serve")
    base = load_base(tiny_base_dir)
    folders = {"derain": str(root / "derain"), "cartoonize": str(root / "cartoonize"), "denoise": str(root / "dir" / "denoise")}
    save_adapter(random_lora(base, "derain", rank=2, seed=1), folders["derain"])
    save_adapter(random_lora(base, "cartoonize", rank=4, seed=2), folders["cartoonize"])
    save_adapter(random_custom_diffusion(base, "denoise", seed=3), folders["denoise"])
    with socket.socket() as s:  # a free port: bind to 0, read it, release it for the server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "adapterkit", "serve", "--base", tiny_base_dir, "--adapter", folders["derain"],
               "--adapter", folders["cartoonize"], "--adapter-dir", str(root / "dir"), "--port", str(port),
               "--max-batch", "4", "--batch-wait-ms", "50", "--queue", "6", "--max-body-mb", "0.25", "--timeout", "60"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(root / "server.log", "w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"adapterkit serve exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            if requests.get(url + "/healthz", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("adapterkit serve did not answer /healthz within 180 s")
        time.sleep(0.3)
    yield {"url": url, "base": tiny_base_dir, "folders": folders, "adapter_dir": str(root / "dir"), "root": root,
           "process": process, "log": str(root / "server.log")}
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _bench_module(name: str):
    """bench/NAME.py as a module (bench/ is not a package), for tests of its helpers."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_tasks_bench():
    return _bench_module("tiny_tasks")


@pytest.fixture(scope="session")
def fresh_tasks_bench():
    return _bench_module("fresh_tasks")
