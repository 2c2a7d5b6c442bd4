"""Where the pipeline runs and in what precision: `--device` and `--dtype` of edit, eval, demo and serve.

"auto" is what a diffusers user does by hand: the GPU when torch sees one (CUDA, else Apple's MPS), else the CPU;
float16 on CUDA (diffusers' examples load IP2P with torch_dtype=torch.float16: half the memory, about twice the
speed), float32 elsewhere (float16 on a CPU is slow; bfloat16 on one is fast only with native support, and is there
to be asked for). Training picks its device through accelerate and its precision with --mixed-precision; merges
run on the CPU (float64 solves).
"""

from __future__ import annotations

from .errors import AdapterkitError

AUTO = "auto"
DTYPE_NAMES = (AUTO, "float32", "float16", "bfloat16")
DEVICE_HELP = "auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps."
DTYPE_HELP = "Weights and activations: auto (float16 on CUDA, else float32), float32, float16, bfloat16."


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


def pick_dtype(name: str, device: str):
    """'auto' -> torch.float16 on CUDA, torch.float32 elsewhere; a name of DTYPE_NAMES -> that dtype."""
    import torch

    if name == AUTO:
        return torch.float16 if device.startswith("cuda") else torch.float32
    if name not in DTYPE_NAMES:
        raise AdapterkitError(f"--dtype {name!r} is not one of {', '.join(DTYPE_NAMES)}")
    return getattr(torch, name)


def placement(device: str = AUTO, dtype: str = AUTO) -> tuple[str, object]:
    """(device, torch dtype) for `load_base` from the two option values."""
    chosen = pick_device(device)
    return chosen, pick_dtype(dtype, chosen)


def describe(device: str, dtype) -> str:
    """'device: cpu, float32', the line edit and eval print."""
    return f"device: {device}, {str(dtype).replace('torch.', '')}"
