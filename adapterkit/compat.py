"""Workarounds for upstream behaviour, in one place, each with the versions it applies to.

Checked against diffusers 0.42.1, peft 0.21.2, transformers 5.23-5.25, bitsandbytes 0.50.2, torch 2.13.
Upstream facts documented elsewhere and handled where they bite:
- diffusers#9320 (`unet.load_attn_procs` installs nothing for Custom Diffusion files): adapterkit never calls it;
  adapters/custom_diffusion.py copies K/V weights itself. tests/test_adapters.py
  (test_diffusers_9320_...) fails once upstream is fixed.
- diffusers#4960 (SD1.5 -> IP2P conversion leaves conv_in's bias random): base.convert_sd15_to_ip2p copies it.
- transformers 5 returns an empty CLIPTokenizer offline: base._check_tokenizer refuses it.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_third_party_logs() -> None:
    """Keep the terminal to adapterkit's own output: upstream loaders print progress bars and notices per load.

    - bitsandbytes 0.50 on CPUs with AVX512-BF16 fetches a 4-bit CPU kernel adapterkit never uses from the hub at
      import (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`) and logs a warning when the optional
      `kernels` package is missing; with `kernels` installed (transformers 5.25 requires it) and the hub offline,
      `kernels` logs "Skipping publisher trust check ..." on stderr instead.
    - transformers 5 warns that torchvision is missing for image processors adapterkit does not use.
    - diffusers 0.42 deprecates `torch_dtype` in favour of `dtype` while most snippets still use it.
    Set ADAPTERKIT_VERBOSE=1 to see everything.
    """
    if os.environ.get("ADAPTERKIT_VERBOSE"):
        return
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated.*")
    warnings.filterwarnings("ignore", message=".*No LoRA keys associated to CLIPTextModel.*")


def quiet_library_logs() -> None:
    """The transformers / diffusers part of `quiet_third_party_logs`: it imports both libraries (and so torch), so
    base.py and tiny.py call it when they are imported, before any pipeline loads, and `import adapterkit` stays
    light."""
    if os.environ.get("ADAPTERKIT_VERBOSE"):
        return
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency of diffusers pipelines
        pass
    try:
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
