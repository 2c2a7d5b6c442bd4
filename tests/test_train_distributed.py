"""`torchrun --nproc_per_node 2` on CPU (gloo): one adapter written, both processes ended with identical weights."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from adapterkit.testing import make_edit_dataset, make_trainable_tiny_base
from safetensors.torch import load_file


def _checksum(tensors) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("method", ["lora"])
def test_torchrun_two_processes_on_cpu(tmp_path, method):
    base = make_trainable_tiny_base(tmp_path / "base")
    data = make_edit_dataset(tmp_path / "data", 8, size=32)
    output = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "--no-python", sys.executable, "-c", "from adapterkit.cli import main; main()",
        "train", "--base", base, "--data", data, "--method", method, "--task", "invert", "--output", str(output),
        "--resolution", "32", "--steps", "4", "--batch-size", "2", "--gradient-accumulation", "2",
        "--validation-steps", "2", "--validation-rows", "1", "--validation-inference-steps", "2",
        "--checkpoint-steps", "2", "--log-with", "none", "--quiet",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)  # ~12 s normally; a hang fails fast
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("adapter 'invert' ->") == 2  # each process reports the one shared output folder
    meta = json.load(open(output / "adapter.json"))
    training = meta["training"]
    assert training["num_processes"] == 2 and training["global_batch_size"] == 2 * 2 * 2
    checksums = training["replica_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert checksums[0] == _checksum(meta_tensors(output))  # what each process held is what was written
    assert sorted(os.listdir(output / "checkpoints")) == ["checkpoint-2", "checkpoint-4"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(output / "checkpoints" / "checkpoint-4"))
    assert os.path.isfile(output / "validation" / "step-4.png")
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.")]  # no temporary folders left


def meta_tensors(output):
    """The adapter's tensors under adapterkit's keys, as the loop checksummed them."""
    from adapterkit.adapters import load_adapter

    assert os.path.isfile(output / "pytorch_lora_weights.safetensors")
    load_file(output / "pytorch_lora_weights.safetensors")  # plain safetensors file
    return load_adapter(str(output)).tensors


def _free_port() -> int:
    """A port nobody listens on now: a fixed one collides with a run left over from an earlier (hung) test."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

