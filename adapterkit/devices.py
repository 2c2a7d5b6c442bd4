"""Where the pipeline runs and in what precision: `--device` and `--dtype` of edit, eval and serve.

`--device auto` is what a user of a GPU expects from a command: the GPU when torch sees one (CUDA, else Apple's
MPS), else the CPU. `--dtype` stays float32 unless asked (STYLE.md: safe defaults, speed opt-in, as diffusers
loads in float32 unless given torch_dtype); float16 halves the weights' memory and runs on a GPU's half-precision
units, bfloat16 likewise where the hardware has them. Training picks its device through accelerate and its
precision with --mixed-precision; merges run on the CPU (float64 solves).
"""

from __future__ import annotations

from .errors import AdapterkitError

AUTO = "auto"
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = "float32"
DEVICE_HELP = "auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps."
DTYPE_HELP = "Precision of the weights and activations (float16: half the memory, a GPU's half-precision units)."


def pick_device(name: str = AUTO) -> str:
    """'auto' -> 'cuda' / 'mps' / 'cpu' by what torch sees; any other name is checked: a one-line error for a name
    torch does not know, or for a GPU this torch cannot reach (a CPU build, no driver)."""
    import torch

    if name == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise AdapterkitError(f"--device {name!r} is not a device torch knows; pass auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AdapterkitError(f"--device {name} but this torch ({torch.__version__}) sees no CUDA GPU; pass --device cpu, "
                              "or install a CUDA build of torch on a machine with an NVIDIA driver")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise AdapterkitError(f"--device {name} but torch sees {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise AdapterkitError(f"--device {name} but MPS is not available here; pass --device cpu")
    return str(device)


def pick_dtype(name: str = DEFAULT_DTYPE):
    """A name of DTYPE_NAMES -> that torch dtype."""
    import torch

    if name not in DTYPE_NAMES:
        raise AdapterkitError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def placement(device: str = AUTO, dtype: str = DEFAULT_DTYPE) -> tuple[str, object]:
    """(device, torch dtype) for `load_base` from the two option values."""
    return pick_device(device), pick_dtype(dtype)


def dtype_name(dtype) -> str:
    """torch.float16 (or "float16") -> "float16"."""
    return str(dtype).replace("torch.", "")


def record(pipe) -> dict:
    """Where a loaded pipeline runs, as results.json and report.json keep it: {"device": "cuda", "dtype": "float16"}."""
    return {"device": pipe.device.type, "dtype": dtype_name(pipe.unet.dtype)}


def describe(device: str, dtype) -> str:
    """'device: cpu, float32', the line edit, eval and serve print; float16 on a CPU says it is slow (builtin:tiny,
    8 edits of 20 steps on 2 cores: float32 2.8 s, float16 37.7 s, bfloat16 2.0 s; session 21)."""
    name = dtype_name(dtype)
    slow = " (slow on a CPU: float32 or bfloat16 run faster)" if name == "float16" and device.startswith("cpu") else ""
    return f"device: {device}, {name}{slow}"
