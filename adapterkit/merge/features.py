"""Text-encoder features for merging: the rows the cross-attention K/V weights multiply.

Every attn2 `to_k`/`to_v` weight W (d_out, d_text) reads the token-level hidden states the pipeline's
`encode_prompt` feeds the UNet: `text_encoder(ids)[0]`, shape (n, 77, d_text). A merge constrains W on the rows of
the tasks' instructions (targets) and keeps it close to the base on many other prompts (regularization).

Which token positions are targets (`positions`):
- "eos" (default): positions 1 .. first EOS inclusive, as Custom Diffusion's official merge does. The start token
  (position 0) sees only itself through CLIP's causal mask, so its row is identical for every prompt: constraining it
  would pit every task against every other. The padding positions after the first EOS are left to regularization.
- "eos+padding": those rows plus the padding block after EOS summarised by its top PADDING_DIRECTIONS principal
  directions (`padding_directions`). The UNet reads the padding positions too, and an adapter changes what it makes
  of them; but they are nearly the same directions for every prompt and for "", so constraining them pits the tasks
  against each other unless each adapter was trained to leave other prompts alone (`--kv-preservation`,
  train/preservation.py). "auto", the merge's default, takes this rule when every source was trained that way.
- "all": every one of the 77 positions, padding included (the start token, shared by all tasks, gets the mean target
  like any shared row). Exact only while the row count stays below d_text: about 10 instructions for SD1.5; with
  `lsq-soft` it always solves.
The UNet attends to all 77 positions and, through guidance, to the empty prompt: what these choices do to edited
images was measured on tiny bases (bench/merge.py, README): constraining padding helps when the text features leave
room for it, and the empty prompt stays on the regularization side, as the base's unconditional branch.

Regularization rows (`reg_positions`) are every position of every regularization prompt, exactly as the UNet sees
them ("all", default), or positions 1..first EOS as the reference code takes them ("eos", for the paper-exact
mode). Only their Gram matrix M = C_reg^T C_reg / n is kept: the solve and the drift need nothing else.

Both are cached per base under `$ADAPTERKIT_CACHE/features/<fingerprint>/` (default ~/.cache/adapterkit), keyed by
the texts, the position rule and a probe of the text encoder (the fingerprint hashes the UNet only).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources

import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

from ..adapters import tokens
from ..adapters.safe_load import load_safetensors
from ..errors import AdapterkitError
from ..fileio import atomic_file
from ..inference import encode_text, text_gram
from .methods import REG_POSITIONS, TARGET_POSITIONS  # one list of position rules, with the merge options

PADDING_DIRECTIONS = 3  # eos+padding: principal directions kept per instruction's padding block (README, merge)
FEATURES_VERSION = 2  # bump when the way rows are chosen changes: old cache entries are then ignored
BATCH_SIZE = 128  # per text-encoder call: per-call overhead dominates small batches on CPU
_PROBE = "a photo of a cat, make it snowy at night"


def builtin_reg_prompts_path() -> str:
    return str(resources.files("adapterkit") / "merge" / "reg_prompts.txt")


def read_prompts(path: str | None = None) -> list[str]:
    """Regularization prompts: one per line, '#' comments and blank lines skipped, plus the empty prompt "".

    "" is always included: two of the three guidance branches of IP2P condition on it.
    """
    path = path or builtin_reg_prompts_path()
    if not os.path.isfile(path):
        raise AdapterkitError(f"regularization prompt file {path} does not exist; pass a text file with one prompt per line")
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        prompts = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise AdapterkitError(f"{path} holds no prompts; write one prompt per line")
    return sorted(set(prompts) | {""})


def encode_tokens(pipe, texts: list[str], quiet: bool = True, desc: str = "text features") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, 77) int64, hidden (n, 77, d_text) float32): exactly what encode_prompt gives the UNet."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    texts = list(texts)
    ids, chunks = [], []
    for start in tqdm(range(0, len(texts), BATCH_SIZE), desc=desc, unit="batch", disable=quiet or len(texts) <= BATCH_SIZE):
        encoded = encode_text(tokenizer, encoder, texts[start : start + BATCH_SIZE])
        ids.append(encoded.ids)
        chunks.append(encoded.hidden.cpu())  # (b, 77, d_text)
    if not chunks:
        return torch.zeros(0, tokenizer.model_max_length, dtype=torch.long), torch.zeros(0, tokenizer.model_max_length, encoder.config.hidden_size)
    return torch.cat(ids), torch.cat(chunks)


def first_eos(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(n,) index of the first EOS token of each row; a truncated prompt ends in EOS at position 76."""
    is_eos = ids == eos_id
    return torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(ids[:, 0], ids.shape[1] - 1))


def select_rows(ids: torch.Tensor, hidden: torch.Tensor, eos_id: int, positions: str) -> list[torch.Tensor]:
    """Per text, the (k, d_text) rows to constrain: positions 1..first EOS ("eos"), or all 77 ("all")."""
    if positions not in TARGET_POSITIONS:
        raise AdapterkitError(f"unknown positions rule '{positions}'; use one of {', '.join(TARGET_POSITIONS)}")
    if positions == "all":
        return [h for h in hidden]

    ends = first_eos(ids, eos_id)
    rows = [hidden[i, 1 : int(ends[i]) + 1] for i in range(hidden.shape[0])]
    if positions == "eos+padding":
        rows = [torch.cat([r, padding_directions(hidden[i, int(ends[i]) + 1 :]).to(r.dtype)]) for i, r in enumerate(rows)]
    return rows


def padding_directions(block: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(<= k, d_text): the top-k principal directions of one instruction's padding rows (n_pad, d_text), each scaled by
    its singular value / sqrt(n_pad), the root-mean-square size of the block along it. A weight that matches the
    adapter on these rows matches it on the block up to the energy outside them (builtin:tiny v2: 3 directions hold
    99.8% of the empty prompt's rows; the padding positions are 70 of the 77 rows the UNet reads)."""
    if block.shape[0] == 0:  # a truncated prompt ends in EOS at position 76: no padding
        return block
    k = PADDING_DIRECTIONS if k is None else k  # read at call time, as the cache key reads it
    _u, s, vh = torch.linalg.svd(block.double(), full_matrices=False)
    k = min(k, int((s > s[0] * 1e-6).sum()))
    return s[:k, None] * vh[:k] / block.shape[0] ** 0.5


def instruction_features(base, instructions: list[str], positions: str = "eos", quiet: bool = True) -> dict[str, torch.Tensor]:
    """Instruction text -> its (k, d_text) float64 target rows. Texts are encoded in sorted order (input order free)."""
    texts = sorted(set(instructions))
    if not texts:
        return {}
    # The rows depend on how many padding directions are kept: a cache entry made with another count is not reused.
    key = _cache_key(base, "instructions", texts, positions + (f"/{PADDING_DIRECTIONS}" if positions == "eos+padding" else ""))
    cached = _read_cache(base, key)
    if cached is not None and all(f"text.{_text_id(t)}" in cached for t in texts):
        return {t: cached[f"text.{_text_id(t)}"].double() for t in texts}
    ids, hidden = encode_tokens(base.pipe, texts, quiet=quiet, desc="instruction features")
    rows = select_rows(ids, hidden, base.pipe.tokenizer.eos_token_id, positions)
    features = {t: r.double() for t, r in zip(texts, rows)}
    _write_cache(base, key, {f"text.{_text_id(t)}": r.float().contiguous() for t, r in features.items()})
    return features


def regularization_gram(base, prompts: list[str], quiet: bool = True, positions: str = "all") -> tuple[torch.Tensor, int]:
    """(M (d_text, d_text) float64 = C_reg^T C_reg / n, n): Gram of every position ("all") or of positions 1..first
    EOS ("eos") of every prompt."""
    if positions not in REG_POSITIONS:
        raise AdapterkitError(f"unknown regularization positions rule '{positions}'; use one of {', '.join(REG_POSITIONS)}")
    prompts = sorted(set(prompts))
    key = _cache_key(base, "regularization", prompts, "every-position" if positions == "all" else "first-eos")
    cached = _read_cache(base, key)
    if cached is not None and "gram" in cached and "rows" in cached:
        return cached["gram"].double(), int(round(cached["rows"].item()))
    eos_id = base.pipe.tokenizer.eos_token_id
    select = None if positions == "all" else (lambda ids, hidden: torch.cat(select_rows(ids, hidden, eos_id, "eos")))
    gram, rows = text_gram(base.pipe.tokenizer, base.pipe.text_encoder, prompts, select, BATCH_SIZE,
                           progress=lambda batches: tqdm(batches, desc="regularization features", unit="batch", disable=quiet))
    _write_cache(base, key, {"gram": gram, "rows": torch.tensor([rows], dtype=torch.float64)})  # float: load refuses ints
    return gram, rows


def with_base_instructions(base, gram: torch.Tensor, rows: int, weight: float, quiet: bool = True,
                           positions: str = "all") -> tuple[torch.Tensor, float]:
    """(M', effective rows): the regularization Gram M of `rows` rows with every row of the base's own instructions
    (adapterkit_base.json "instructions") counted `weight` times: M' = (n M + w n_b M_b) / (n + w n_b). Listing them
    in --reg-prompts would count them once (prompts are deduplicated), among 50,000-odd rows of other prompts."""
    recorded = base.instructions
    if weight <= 0 or not recorded:
        return gram, float(rows)
    own_gram, own_rows = regularization_gram(base, recorded, quiet=quiet, positions=positions)
    heavy = weight * own_rows
    return (rows * gram + heavy * own_gram) / (rows + heavy), rows + heavy


# ---------------------------------------------------------------------------------------------------- cache
def cache_root() -> str:
    root = os.environ.get("ADAPTERKIT_CACHE")
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "adapterkit")


def _text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@torch.no_grad()
def text_encoder_probe(pipe) -> str:
    """Hash of the text encoder's output on a fixed prompt: the base fingerprint covers the UNet only."""
    cached = getattr(pipe, "_adapterkit_text_probe", None)
    if cached:
        return cached
    _ids, hidden = encode_tokens(pipe, [_PROBE])
    digest = hashlib.sha256(hidden.to(torch.float16).view(torch.int16).numpy().tobytes()).hexdigest()[:16]
    try:
        pipe._adapterkit_text_probe = digest
    except AttributeError:  # pragma: no cover - a pipeline class that forbids new attributes
        pass
    return digest


def _cache_key(base, kind: str, texts: list[str], rule: str) -> str:
    spec = {"version": FEATURES_VERSION, "kind": kind, "rule": rule, "texts": texts, "text_encoder": text_encoder_probe(base.pipe)}
    if tokens.digest(base.pipe):  # modifier tokens installed (adapters/tokens.py): features depend on their rows
        spec["tokens"] = tokens.digest(base.pipe)
    return kind + "-" + hashlib.sha256(json.dumps(spec, sort_keys=True).encode("utf-8")).hexdigest()[:24]


def _cache_path(base, key: str) -> str:
    return os.path.join(cache_root(), "features", base.fingerprint, key + ".safetensors")


def _read_cache(base, key: str) -> dict[str, torch.Tensor] | None:
    if os.environ.get("ADAPTERKIT_NO_CACHE"):
        return None
    path = _cache_path(base, key)
    if not os.path.isfile(path):
        return None
    try:
        return load_safetensors(path)
    except AdapterkitError:  # a damaged entry is recomputed and overwritten, never trusted
        return None


def _write_cache(base, key: str, tensors: dict[str, torch.Tensor]) -> None:
    if os.environ.get("ADAPTERKIT_NO_CACHE"):
        return
    try:
        with atomic_file(_cache_path(base, key)) as f:
            f.write(safetensors_bytes(tensors))
    except AdapterkitError:  # an unwritable cache only costs recomputation next time
        pass
