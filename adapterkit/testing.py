"""Tiny objects tests/ and bench/ share: random adapters on a tiny base, small images, edit datasets, a trainable
tiny base. Public so that benchmarks need nothing from tests/ (and no sys.path tricks)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .adapters import custom_diffusion, lora
from .adapters.record import Adapter
from .base import BASE_INFO_FILE, cross_attention_kv_layers


def random_image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * 200 + rng.rand(size, size, 3) * 55
    return Image.fromarray(base.astype(np.uint8))


def random_custom_diffusion(base, task: str, seed: int = 0, strength: float = 0.5, instructions=None) -> Adapter:
    """K/V = base K/V + noise: a synthetic Custom Diffusion adapter that visibly changes the output."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in cross_attention_kv_layers(base.unet).items():
        w = layer.weight.detach().float().cpu()
        tensors[name] = w + strength * w.std() * torch.randn(w.shape, generator=gen)
    return Adapter(
        method=custom_diffusion.METHOD,
        task=task,
        instructions=instructions or [f"{task} the image"],
        tensors=tensors,
        base={"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
    )


def random_lora(base, task: str, rank: int = 4, alpha: float | None = None, seed: int = 0, targets="kv", instructions=None) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    config = lora.make_config(rank, alpha, targets)
    named = dict(base.unet.named_modules())
    tensors = {}
    for name, module in named.items():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in config["target_modules"]):
            d_out, d_in = module.weight.shape
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) / d_in**0.5
            tensors[f"{name}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.3
    return Adapter(
        method=lora.METHOD,
        task=task,
        instructions=instructions or [f"{task} the image"],
        tensors=tensors,
        base={"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
        options=config,
    )


def to_array(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float32) / 255.0


def make_edit_dataset(
    folder,
    n: int,
    size: int = 64,
    seed: int = 0,
    instructions=("invert the image",),
    columns=("input_image", "edited_image", "edit_prompt"),
    edit=None,
    unreadable=(),
) -> str:
    """A local edit dataset: `folder/metadata.jsonl` + in/i.png, out/i.png (datasets' imagefolder convention).

    Inputs are smooth random colour fields; targets are `edit(input)` (default: colour inversion, a task a tiny
    model can learn). Instructions cycle through `instructions`. Rows listed in `unreadable` get an input file
    that is not an image. `columns` names the input, target and instruction columns (metadata keys
    `<input>_file_name`, `<target>_file_name`, `<instruction>`).
    """
    import json
    import os

    from PIL import ImageOps

    folder = str(folder)
    os.makedirs(os.path.join(folder, "in"), exist_ok=True)
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    edit = edit or ImageOps.invert
    rng = np.random.RandomState(seed)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            corners = rng.rand(2, 2, 3) * 255  # bilinear colour field from four random corner colours
            t = np.linspace(0, 1, size)[:, None, None]
            s = np.linspace(0, 1, size)[None, :, None]
            field = (1 - t) * ((1 - s) * corners[0, 0] + s * corners[0, 1]) + t * ((1 - s) * corners[1, 0] + s * corners[1, 1])
            img = Image.fromarray(np.clip(field + rng.randn(size, size, 3) * 8, 0, 255).astype(np.uint8))
            img.save(os.path.join(folder, "in", f"{i}.png"))
            edit(img).save(os.path.join(folder, "out", f"{i}.png"))
            if i in unreadable:
                with open(os.path.join(folder, "in", f"{i}.png"), "wb") as bad:
                    bad.write(b"this is not a png")
            row = {
                f"{columns[0]}_file_name": f"in/{i}.png",
                f"{columns[1]}_file_name": f"out/{i}.png",
                columns[2]: instructions[i % len(instructions)],
            }
            f.write(json.dumps(row) + "\n")
    return folder


def make_trainable_tiny_base(folder, seed: int = 0) -> str:
    """A tiny random IP2P base on which a K/V adapter can visibly lower the training loss.

    In `make_tiny_pipeline` every UNet GroupNorm has one channel per group (32 groups, 32 channels): it erases the
    per-channel shift that cross-attention on a fixed instruction adds, so attn2 K/V barely move the output and
    the loss cannot fall. Here the UNet uses one group (LayerNorm-like, shifts survive) and cross-attention
    outputs are scaled up 4x, as cross-attention matters in a trained Stable Diffusion UNet.
    """
    import json
    import os

    from diffusers import UNet2DConditionModel

    from .tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline(seed=seed)
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**{**config, "norm_num_groups": 1})
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(4.0)
    pipe.register_modules(unet=unet.eval())
    pipe.save_pretrained(str(folder))
    with open(os.path.join(str(folder), BASE_INFO_FILE), "w", encoding="utf-8") as f:
        json.dump({"resolution": 64, "made_by": "tests/factories.make_trainable_tiny_base", "seed": seed}, f)  # name kept: base files stay byte-identical
    return str(folder)


def instruction_custom_diffusion(base, task: str, instructions: list[str], seed: int = 0, strength: float = 1.0) -> Adapter:
    """K/V changed only along the task's own instruction token features (positions 1..first EOS), with the span of
    the empty prompt's features removed: how the UNet reads this instruction changes, its unconditional branch does
    not. A gradient step only moves W along the text features it was fed, so trained adapters look like this far
    more than full-rank noise does (for merge tests: least squares assumes tasks differ in what they read).
    """
    from .merge import features

    ids, hidden = features.encode_tokens(base.pipe, list(instructions) + [""])
    rows = torch.cat(features.select_rows(ids[:-1], hidden[:-1], base.pipe.tokenizer.eos_token_id, "eos")).double()
    empty, _ = torch.linalg.qr(hidden[-1].double().T)  # (d_text, 77): orthonormal span of the empty prompt's rows
    rows = rows - (rows @ empty) @ empty.T
    basis, _ = torch.linalg.qr(rows.T)  # (d_text, k)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in cross_attention_kv_layers(base.unet).items():
        w = layer.weight.detach().double().cpu()
        noise = torch.randn(w.shape, generator=gen, dtype=torch.float64) @ basis @ basis.T  # (d_out, d_text), rank k
        tensors[name] = (w + strength * w.std() * noise * (w.shape[1] / basis.shape[1]) ** 0.5).float()
    return Adapter(
        method=custom_diffusion.METHOD,
        task=task,
        instructions=list(instructions),
        tensors=tensors,
        base={"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
    )
