"""Modifier tokens: the word embeddings diffusers' train_custom_diffusion.py learns with `--modifier_token "<new1>"`.

The script writes, beside the K/V file, one file per token: `<new1>.safetensors` holding {"<new1>": (d_text,)}, or
with `--no_safe_serialization` `<new1>.bin` (torch.save of the same dict; versions before 0.27 wrote safetensors
bytes under the `.bin` name). Plain diffusers applies it with `pipe.load_textual_inversion(folder, weight_name=...)`:
the token joins the tokenizer and its embedding becomes a new row of the text encoder's input embeddings.

An adapter owns its tokens (`Adapter.tokens`: token -> (d_text,) float32). On a pipeline a token is added once
(tokenizer + one embedding row, `install`) and the row holds the owning adapter's embedding only while that adapter
is active (`TokenSwap`, driven by AdapterBank) or while its features are computed (`applied`, used by routing and
merging); otherwise it holds the row it had when added. Two adapters may own tokens of the same name (the script's
default is always "<new1>"): each gets its own embedding when active.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

import torch
from safetensors.torch import save_file

from ..errors import AdapterkitError
from .safe_load import load_safetensors, load_torch_bin

EXTENSIONS = (".safetensors", ".bin")
# adapterkit's own companion files in an adapter folder, never token files: a merged adapter's constraint rows and
# targets (merge/incremental.py reads and writes it under this name).
MERGE_CONSTRAINTS_FILE = "merge_constraints.safetensors"
_REGISTRY = "_adapterkit_tokens"  # pipe attribute: token -> (row id, the row's value when the token was added)


def read(folder: str, weight_files: set[str]) -> dict[str, torch.Tensor]:
    """Every modifier-token file in `folder` (any .safetensors / .bin that is not one of `weight_files`).

    A file of another kind is refused, never skipped: an adapter folder holds nothing adapterkit would ignore.
    """
    tokens: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name in weight_files or name == MERGE_CONSTRAINTS_FILE or not name.endswith(EXTENSIONS) or not os.path.isfile(path):
            continue
        token, embedding = _read_token_file(path)
        if token in tokens:
            raise AdapterkitError(f"{folder} holds two embeddings of modifier token '{token}' (.safetensors and .bin); keep one")
        tokens[token] = embedding
    return tokens


def _read_token_file(path: str) -> tuple[str, torch.Tensor]:
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip archive ("PK") or, in its legacy format, a pickle (0x80); the rest is safetensors.
    sd = load_torch_bin(path) if head[:2] == b"PK" or head[:1] == b"\x80" else load_safetensors(path)
    embedding = next(iter(sd.values()))
    if len(sd) != 1 or embedding.dim() not in (1, 2):
        raise AdapterkitError(
            f"{path} is neither the adapter's weight file nor a modifier-token embedding ({{token: (d_text,)}}, as "
            "train_custom_diffusion.py --modifier_token writes); move it out of the adapter folder"
        )
    token = next(iter(sd))
    if embedding.dim() == 2 and embedding.shape[0] == 1:
        embedding = embedding[0]
    if embedding.dim() != 1:
        raise AdapterkitError(
            f"{path}: modifier token '{token}' has {embedding.shape[0]} vectors; adapterkit reads one-vector tokens "
            "(what train_custom_diffusion.py writes)"
        )
    return token, embedding.float()


def write(folder: str, tokens: dict[str, torch.Tensor]) -> None:
    """`<token>.safetensors` per token, {token: (d_text,)} as train_custom_diffusion.py writes it."""
    for token, embedding in tokens.items():
        check_name(token)
        save_file({token: embedding.detach().to("cpu", torch.float32).contiguous()},
                  os.path.join(folder, file_name(token)), metadata={"format": "pt"})


def file_name(token: str) -> str:
    return token + ".safetensors"


def check_name(token: str) -> None:
    if not token or token.strip() != token or any(c in token for c in "/\\\0") or token.startswith("."):
        raise AdapterkitError(f"modifier token {token!r} cannot name a file; use a token such as <new1>")


def check(tokens: dict[str, torch.Tensor], pipe) -> None:
    """Refuse tokens of another text width, or words the base's tokenizer already has (as load_textual_inversion)."""
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    added = getattr(pipe, _REGISTRY, {})
    vocab = pipe.tokenizer.get_vocab()
    for token, embedding in tokens.items():
        if embedding.shape[-1] != width:
            raise AdapterkitError(
                f"modifier token '{token}' has width {embedding.shape[-1]} but the base's text encoder has {width}; "
                "the adapter was made for another base"
            )
        if token in vocab and token not in added:
            raise AdapterkitError(f"modifier token '{token}' is already a word of the base's tokenizer; retrain with another --modifier_token")


def install(pipe, tokens) -> dict[str, int]:
    """Add each token (not yet added) to the tokenizer and one row to the text encoder; token -> row id."""
    check(tokens, pipe)
    registry = getattr(pipe, _REGISTRY, None)
    if registry is None:
        registry = {}
        setattr(pipe, _REGISTRY, registry)
    new = [t for t in tokens if t not in registry]
    if new:
        pipe.tokenizer.add_tokens(new)
        pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
        weight = pipe.text_encoder.get_input_embeddings().weight
        for token in new:
            row = pipe.tokenizer.convert_tokens_to_ids(token)
            registry[token] = (row, weight[row].detach().clone())
    return {t: registry[t][0] for t in tokens}


def _set_rows(pipe, tokens: dict[str, torch.Tensor]) -> None:
    weight = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token, row in install(pipe, tokens).items():
            weight[row].copy_(tokens[token].to(weight.device, weight.dtype))


def _reset_rows(pipe, names) -> None:
    registry = getattr(pipe, _REGISTRY, {})
    _set_rows(pipe, {t: registry[t][1] for t in names if t in registry})


@contextlib.contextmanager
def applied(pipe, tokens: dict[str, torch.Tensor]):
    """The tokens' embeddings in the text encoder inside the block; their resting rows back afterwards."""
    if not tokens:
        yield
        return
    weight = pipe.text_encoder.get_input_embeddings().weight
    rows = install(pipe, tokens)
    before = {t: weight[r].detach().clone() for t, r in rows.items()}
    _set_rows(pipe, tokens)
    try:
        yield
    finally:
        _set_rows(pipe, before)


def union(adapters) -> dict[str, torch.Tensor]:
    """Every token of `adapters` (a merge holds them all); refuses one name with two different embeddings."""
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for adapter in adapters:
        for token, embedding in (adapter.tokens or {}).items():
            if token in out and not torch.equal(out[token], embedding):
                raise AdapterkitError(
                    f"adapters '{owner[token]}' and '{adapter.task}' both own modifier token '{token}' with different "
                    "embeddings, and one adapter holds one embedding per token; retrain one with another "
                    "--modifier_token (e.g. <new2>)"
                )
            out[token], owner[token] = embedding, adapter.task
    return out


def digest(pipe) -> str:
    """Hash of the added tokens' names and current rows ("" when none): text features depend on them."""
    registry = getattr(pipe, _REGISTRY, {})
    if not registry:
        return ""
    weight = pipe.text_encoder.get_input_embeddings().weight
    h = hashlib.sha256()
    for token, (row, _rest) in sorted(registry.items()):
        h.update(token.encode("utf-8"))
        h.update(weight[row].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TokenSwap:
    """AdapterBank's hook: the active adapter's token embeddings in the text encoder, resting rows otherwise."""

    def __init__(self, pipe):
        self.pipe = pipe
        self._active: list[str] = []

    def add(self, adapter) -> None:
        if adapter.tokens:
            install(self.pipe, adapter.tokens)

    def activate(self, adapter) -> None:
        self.deactivate()
        if adapter is not None and adapter.tokens:
            _set_rows(self.pipe, adapter.tokens)
            self._active = list(adapter.tokens)

    def deactivate(self) -> None:
        if self._active:
            _reset_rows(self.pipe, self._active)
            self._active = []

    def close(self) -> None:
        self.deactivate()
