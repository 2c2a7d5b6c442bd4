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
