"""Load an InstructPix2Pix base, convert SD1.5 into one, and fingerprint it.

A base is a diffusers `StableDiffusionInstructPix2PixPipeline`: a hub id, a local diffusers folder, or a built-in
name (`builtin:tiny`, `builtin:tiny-random`). Its fingerprint is a short hash of the UNet config and of every
cross-attention K/V weight, the only weights adapters may replace; adapters record it and are refused elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources

import torch

from .compat import quiet_library_logs
from .errors import AdapterkitError, first_line
from .fileio import BASE_INFO_FILE

quiet_library_logs()  # before any pipeline loads (compat.py)

IP2P_TRAINING_RESOLUTION = 256
BUILTIN_TINY = "builtin:tiny"
BUILTIN_TINY_RANDOM = "builtin:tiny-random"
# Config keys that decide whether two UNets are the same network shape.
_FINGERPRINT_CONFIG_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "down_block_types",
    "up_block_types",
)


@dataclass
class Base:
    """A loaded base: the pipeline plus what adapters are checked against."""

    pipe: object  # StableDiffusionInstructPix2PixPipeline
    name_or_path: str
    fingerprint: str
    resolution: int = IP2P_TRAINING_RESOLUTION  # the base's own training resolution when recorded
    info: dict = field(default_factory=dict)  # contents of adapterkit_base.json, when present
    # compute_fingerprint of the K/V as they sit in memory: `fingerprint` except on a base cast to bfloat16 after its
    # load (_load_dtype). AdapterBank checks it to catch an adapter another bank left active. "": same as fingerprint.
    loaded_fingerprint: str = ""

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def instructions(self) -> list[str]:
        """The edit instructions the base was trained to follow (adapterkit_base.json "instructions"; builtin:tiny's
        general edits), empty where it records none: a bank routes them to the base, a merge keeps them (merge/)."""
        return list(self.info.get("instructions") or [])

    def sampler(self, steps: int | None = None, guidance: float | None = None, image_guidance: float | None = None) -> Sampler:
        """The sampler settings to use: each one given, else the base's recorded default, else the blog's."""
        return resolve_sampler(self.info, steps=steps, guidance=guidance, image_guidance=image_guidance)


# Sampler setting -> the adapterkit_base.json key a base records its default under (scripts/build_tiny_base.py).
SAMPLER_KEYS = {"steps": "default_steps", "guidance": "default_guidance", "image_guidance": "default_image_guidance"}
SAMPLER_LABELS = {"given": "given", "base": "recorded by the base", "blog": "the IP2P blog's default"}


@dataclass(frozen=True)
class Sampler:
    """Steps and the two guidance scales one run uses, and where each came from ("given", "base" or "blog")."""

    steps: int
    guidance: float
    image_guidance: float
    source: dict  # setting -> "given" | "base" | "blog"

    def options(self) -> dict:
        return {"steps": self.steps, "guidance": self.guidance, "image_guidance": self.image_guidance}

    def record(self) -> dict:
        """What report.json and results.json keep: the values and, per setting, its source."""
        return {**self.options(), "source": dict(self.source)}

    def describe(self) -> str:
        """'sampler: 20 steps, guidance 2, image guidance 1.5 (recorded by the base)', sources grouped."""
        values = f"{self.steps} step{'s' if self.steps != 1 else ''}, guidance {self.guidance:g}, image guidance {self.image_guidance:g}"
        kinds = list(dict.fromkeys(self.source.values()))
        if not kinds:  # a report written before sources were recorded
            return f"sampler: {values}"
        if len(kinds) == 1:
            return f"sampler: {values} ({SAMPLER_LABELS[kinds[0]]})"
        parts = [f"{', '.join(k.replace('_', ' ') for k, v in self.source.items() if v == kind)} {SAMPLER_LABELS[kind]}" for kind in kinds]
        return f"sampler: {values} ({'; '.join(parts)})"


def resolve_sampler(info: dict, steps: int | None = None, guidance: float | None = None,
                    image_guidance: float | None = None) -> Sampler:
    """Issue 18: a base trained to be sampled at other settings (builtin:tiny: guidance 2, image guidance 1.5)
    records them in adapterkit_base.json; eval and edit use them unless told otherwise, else the blog's 20 / 7 / 1.5."""
    from .inference import DEFAULT_GUIDANCE, DEFAULT_IMAGE_GUIDANCE, DEFAULT_STEPS

    blog = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "image_guidance": DEFAULT_IMAGE_GUIDANCE}
    given = {"steps": steps, "guidance": guidance, "image_guidance": image_guidance}
    values, source = {}, {}
    for name, value in given.items():
        recorded = info.get(SAMPLER_KEYS[name])
        if value is not None:
            values[name], source[name] = value, "given"
        elif isinstance(recorded, (int, float)) and not isinstance(recorded, bool):
            values[name], source[name] = recorded, "base"
        else:
            values[name], source[name] = blog[name], "blog"
    return Sampler(int(values["steps"]), float(values["guidance"]), float(values["image_guidance"]), source)


def is_cross_attention_kv(path: str) -> bool:
    """Whether a module path names an attn2 `to_k`/`to_v` Linear: the layers K/V adapters change."""
    return path.endswith(("attn2.to_k", "attn2.to_v"))


def cross_attention_kv_layers(unet) -> dict[str, torch.nn.Linear]:
    """Module path -> Linear for every attn2 `to_k`/`to_v`, sorted by path.

    With a peft LoRA attached, `to_k` is a wrapper; the returned Linear is always the base layer underneath.
    A torch.compile'd UNet is unwrapped, so paths never carry the `_orig_mod.` prefix.
    """
    unet = unwrap_compiled(unet)
    layers = {}
    for name, module in unet.named_modules():
        if is_cross_attention_kv(name):
            layers[name] = unwrap_peft(module)
    if not layers:
        raise AdapterkitError("the base UNet has no cross-attention (attn2) layers; is it a Stable Diffusion UNet?")
    return dict(sorted(layers.items()))


def unwrap_peft(layer):
    """The layer under a peft LoRA wrapper (`get_base_layer()`), else the layer itself."""
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def unwrap_compiled(module):
    """The module under a torch.compile wrapper (OptimizedModule keeps it as `_orig_mod`), else the module."""
    return getattr(module, "_orig_mod", module)


def compute_fingerprint(unet) -> str:
    """16 hex digits of sha256 over the UNet's shape config and its attn2 K/V weights.

    Weights are hashed after rounding to float16, so the same base loaded in fp32 or fp16 has one fingerprint
    (load_base fingerprints a bfloat16 base before its cast: _load_dtype).
    Compute it on the pristine base, before any adapter changes K/V in place.
    """
    digest = hashlib.sha256()
    config = {k: _jsonable(unet.config.get(k)) for k in _FINGERPRINT_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, layer in cross_attention_kv_layers(unet).items():
        weight = layer.weight.detach().to("cpu", torch.float16).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(weight.shape)).encode())
        digest.update(weight.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def builtin_tiny_path() -> str:
    """Folder of the bundled tiny pretrained base (shipped inside the package)."""
    return str(resources.files("adapterkit") / "demo" / "tiny_base")


def local_folder(name_or_path: str) -> str:
    """Where a base name's files are: builtin:tiny's folder in the package, else the name itself (a folder or a hub id)."""
    return builtin_tiny_path() if name_or_path == BUILTIN_TINY else name_or_path


def load_base(
    name_or_path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    convert_sd15: bool = False,
) -> Base:
    """Load an IP2P base from a built-in name, a local diffusers folder or a hub id.

    `convert_sd15=True` accepts a 4-channel text-to-image pipeline and converts it (see `convert_sd15_to_ip2p`).
    Raises AdapterkitError with a one-line fix for: ids not available offline, folders that are not IP2P
    pipelines, and tokenizers that come back empty.
    """
    if name_or_path == BUILTIN_TINY_RANDOM:
        from .tiny import make_tiny_pipeline

        pipe = make_tiny_pipeline(seed=0)
    else:
        path = local_folder(name_or_path)
        if name_or_path == BUILTIN_TINY and not os.path.isfile(os.path.join(path, "model_index.json")):
            raise AdapterkitError(
                "the bundled tiny base is missing from this install; reinstall adapterkit or build it with "
                "scripts/build_tiny_base.py"
            )
        pipe = _from_pretrained(path, name_or_path, _load_dtype(dtype), convert_sd15)
    info = read_base_info(name_or_path)
    _check_tokenizer(pipe, name_or_path)
    fingerprint = compute_fingerprint(pipe.unet)  # before a bfloat16 cast (see _load_dtype)
    cast = dtype != pipe.unet.dtype
    if device is not None or cast:
        pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return Base(
        pipe=pipe,
        name_or_path=name_or_path,
        fingerprint=fingerprint,
        loaded_fingerprint=compute_fingerprint(pipe.unet) if cast else fingerprint,
        resolution=int(info.get("resolution", IP2P_TRAINING_RESOLUTION)),
        info=info,
    )


def _load_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights are read in. The fingerprint rounds K/V to float16, which gives the same bits from a
    float32 or a float16 load, but not from a bfloat16 one (7 mantissa bits, rounded again): a bfloat16 load refused
    every adapter made on the float32 base as made for another base. So bfloat16 (or any other dtype) is read in
    float32, fingerprinted, then cast."""
    return dtype if dtype in (torch.float32, torch.float16) else torch.float32


def read_base_info(name_or_path: str) -> dict:
    """The base's adapterkit_base.json (resolution, sampler defaults, recommended training settings), without
    loading it; {} for a hub id or a folder without one. builtin:tiny-random records only its resolution."""
    if name_or_path == BUILTIN_TINY_RANDOM:
        return {"resolution": 64}
    path = os.path.join(local_folder(name_or_path), BASE_INFO_FILE)
    return _read_json(path) if os.path.isfile(path) else {}


def _from_pretrained(path: str, name: str, dtype: torch.dtype, convert_sd15: bool):
    from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPipeline

    is_local = os.path.isdir(path)
    if is_local and not os.path.isfile(os.path.join(path, "model_index.json")):
        raise AdapterkitError(f"'{name}' is a folder but not a diffusers pipeline (no model_index.json); pass an IP2P pipeline folder")
    if not is_local and (os.path.exists(path) or path.startswith(("/", "./", "../", "~"))):
        raise AdapterkitError(f"base '{name}' is not a folder; pass a diffusers pipeline folder or a hub id")
    if is_local:
        class_name = _read_json(os.path.join(path, "model_index.json")).get("_class_name", "")
        unet_in = _read_json(os.path.join(path, "unet", "config.json")).get("in_channels") if os.path.isfile(
            os.path.join(path, "unet", "config.json")
        ) else None
        if unet_in is None:
            raise AdapterkitError(f"'{name}' has no unet/config.json; pass a Stable Diffusion or IP2P pipeline folder")
        latent = _latent_channels(path)
        if unet_in == latent and not convert_sd15:
            raise AdapterkitError(
                f"'{name}' is a text-to-image pipeline ({class_name}, {unet_in}-channel UNet), not InstructPix2Pix; "
                "convert it with `adapterkit convert-base` or pass convert_sd15=True"
            )
        if unet_in not in (latent, 2 * latent):
            raise AdapterkitError(
                f"'{name}' has a {unet_in}-channel UNet; an IP2P base needs {2 * latent} input channels "
                f"(noisy latent + image latent, {latent} each)"
            )
    pipeline_class = StableDiffusionPipeline if convert_sd15 else StableDiffusionInstructPix2PixPipeline
    try:
        pipe = pipeline_class.from_pretrained(path, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as e:
        if is_local:
            raise AdapterkitError(f"cannot load base '{name}': {first_line(e)}") from e
        raise AdapterkitError(
            f"base '{name}' is not available offline (not a local folder, not in the hub cache); "
            "download it once with network access or pass a local diffusers folder"
        ) from e
    if convert_sd15:
        return convert_sd15_to_ip2p(pipe) if pipe.unet.config.in_channels == 4 else _as_ip2p(pipe)
    needed = 2 * pipe.vae.config.latent_channels  # IP2P: noisy latent + image latent
    if pipe.unet.config.in_channels != needed:
        raise AdapterkitError(f"base '{name}' has a {pipe.unet.config.in_channels}-channel UNet; IP2P needs {needed}")
    return pipe


def _latent_channels(path: str) -> int:
    """The VAE's latent channels as its config states them (4 for Stable Diffusion 1.x/2.x)."""
    vae_config = os.path.join(path, "vae", "config.json")
    return int(_read_json(vae_config).get("latent_channels", 4)) if os.path.isfile(vae_config) else 4


def _check_tokenizer(pipe, name: str) -> None:
    # transformers 5: CLIPTokenizer.from_pretrained(<hub id>) offline returns an empty tokenizer (vocab size 2)
    # instead of failing; a pipeline built on it silently conditions on nothing.
    # Any working CLIP byte-level BPE vocabulary holds at least the 256 byte symbols.
    size = len(pipe.tokenizer)
    if size < 256:
        raise AdapterkitError(
            f"the tokenizer of base '{name}' came back empty (vocabulary size {size}); its files did not load "
            "offline: pass a local folder with tokenizer/vocab.json and merges.txt"
        )


def convert_sd15_to_ip2p(sd_pipe):
    """Turn a Stable Diffusion 1.x text-to-image pipeline into an 8-channel IP2P pipeline.

    conv_in becomes Conv2d(8, C, 3): input channels 0..3 keep the SD weights, 4..7 (the image latent) start at zero,
    so the converted model initially ignores the image. The bias is copied too: diffusers' train_instruct_pix2pix.py
    leaves it at its random init (diffusers#4960).
    """
    unet = sd_pipe.unet
    old = unet.conv_in
    if old.in_channels != 4:
        raise AdapterkitError(f"conv_in has {old.in_channels} input channels; only a 4-channel SD UNet can be converted")
    new = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, old.stride, old.padding, dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :4].copy_(old.weight)  # (C, 4, 3, 3) -> first half of (C, 8, 3, 3)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=8)
    return _as_ip2p(sd_pipe)


def _as_ip2p(sd_pipe):
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(
        vae=sd_pipe.vae,
        text_encoder=sd_pipe.text_encoder,
        tokenizer=sd_pipe.tokenizer,
        unet=sd_pipe.unet,
        scheduler=sd_pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


CONVERTED_BY = "adapterkit convert-base"


def convert_base(source: str, output: str, overwrite: bool = False) -> str:
    """Load an SD1.5 pipeline from `source`, convert it to IP2P and save it to `output` (atomically), with a
    BASE_INFO_FILE naming the source. An `output` holding anything but an earlier conversion (the source itself, an
    adapter, another pipeline) is refused before the load unless `overwrite` (fileio.check_pipeline_replaceable)."""
    from .fileio import atomic_folder, check_pipeline_replaceable

    check_pipeline_replaceable(output, CONVERTED_BY, "the converted pipeline", overwrite, reads=(source,))
    base = load_base(source, convert_sd15=True)
    with atomic_folder(output) as tmp:
        base.pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, BASE_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({"made_by": CONVERTED_BY, "converted_from": source}, f, indent=2)
    return output


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterkitError(f"cannot read {path}: {first_line(e)}") from e
