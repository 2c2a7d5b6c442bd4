"""A tiny InstructPix2Pix pipeline built offline from small configs: for tests, smoke runs and `builtin:tiny-random`.

Everything here is built locally: no hub access. The tokenizer is a real `CLIPTokenizer` over a small vocabulary
written by `write_tiny_vocab`: whole words for common edit instructions (with the merges that build them), plus
every byte-level character with and without the end-of-word marker, so any other text tokenizes character by character.

Known flaw of these "ranked" merges, kept for what was built with them: BPE applies merges by rank, and the merges
of a longer word can pre-empt a shorter word's own ("n o" from "noise" ranks before "s n", so "snow" comes out as
s|no|w). 52 of the 187 words builtin:tiny v2 lists (`scripts/build_tiny_base.py vocabulary_words`) come out in
pieces, e.g. derain (de|rain), color, sketch, from. The bundled base was trained on this tokenization, so it stays
until the base is rebuilt. `merges="learned"` is the fix for that rebuild: the merges are learned from the word list
by BPE training (most frequent pair first), as a real CLIP vocabulary's were, and every listed word comes out whole
(tests/test_tiny_tokenizer.py). What the flaw costs: phrasings give more constraint rows to a merge (merge/lsq.py,
row budget).
"""

from __future__ import annotations

import heapq
import json
import os
import tempfile

import torch

from .compat import quiet_library_logs

quiet_library_logs()  # before any pipeline is built (compat.py)

EOW = "</w>"  # CLIP's end-of-word marker
# Words that get their own token; anything else falls back to characters. Order fixes the token ids.
TINY_WORDS = (
    "a an the it this that image photo picture of and to in with more less make turn into add remove "
    "derain rain cartoon cartoonize cartoonized denoise noise deblur blur sharpen low light lowlight brighten "
    "brighter darken darker contrast grayscale gray grey black white color colour colors hue shift invert "
    "flip posterize sepia enhance fix clean clear restore bright dark sharp smooth edges please photograph "
    "style look like painting sketch drawing cat dog house tree sky water snow night day"
).split()


def _byte_chars() -> list[str]:
    """The 256 printable characters CLIP's byte-level BPE maps bytes to (GPT-2's bytes_to_unicode)."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = visible[:]
    extra = 0
    for b in range(256):
        if b not in visible:
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def tiny_vocab_and_merges(words: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """Token -> id, and BPE merges that build each of `words` left to right ("d e", "de r", ...).

    Special tokens come last, as in CLIP, so the end-of-text token has the highest id.
    """
    built: list[str] = []
    merges: list[str] = []
    for word in sorted(words, key=len, reverse=True):  # longest first: their merges rank first
        pieces = list(word[:-1]) + [word[-1] + EOW]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merges.append(f"{prefix} {piece}")
            prefix += piece
            built.append(prefix)
    return _vocab(built), list(dict.fromkeys(merges))


def _vocab(built: list[str]) -> dict[str, int]:
    """Token -> id: the byte-level characters with and without the end-of-word marker, then `built` (the tokens the
    merges make, in rank order), then the special tokens, so the end-of-text token has the highest id."""
    tokens: list[str] = []
    for ch in _byte_chars():
        tokens += [ch, ch + EOW]
    tokens += built + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}


def learned_vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Token -> id, and BPE merges learned from `words` (each counted once) until every word is one token.

    BPE training: merge the most frequent adjacent pair (ties: the lexicographically smallest, so a build is
    reproducible; the `tokenizers` trainer breaks ties in hash-map order and gave different ids run to run), in
    every word, and repeat. Merges so learned rank as a real BPE vocabulary's do, and replaying them by rank, as
    CLIPTokenizer does, rebuilds each training word whole. Ids as in `tiny_vocab_and_merges`: the byte-level
    characters (with and without the end-of-word marker), one token per merge in rank order, the special tokens.
    """
    unique = list(dict.fromkeys(w.lower() for w in words if w))
    # CLIPTokenizer maps other characters to their UTF-8 bytes before BPE, so merges learned on them would never apply.
    if any(not "!" <= ch <= "~" for w in unique for ch in w):
        raise ValueError("learned merges take words of printable ASCII characters without spaces (e.g. plain lowercase words)")
    seqs = [list(w[:-1]) + [w[-1] + EOW] for w in unique]
    counts: dict[tuple[str, str], int] = {}
    holders: dict[tuple[str, str], set[int]] = {}  # pair -> words that held it (may hold stale entries)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            counts[pair] = counts.get(pair, 0) + 1
            holders.setdefault(pair, set()).add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges: list[str] = []
    while heap:
        negative, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -negative:  # an outdated entry: a fresher one is in the heap (or none is left)
            continue
        merges.append(f"{pair[0]} {pair[1]}")
        touched = set()
        for i in sorted(holders.pop(pair, ())):
            old = seqs[i]
            new, j = [], 0
            while j < len(old):
                if j + 1 < len(old) and (old[j], old[j + 1]) == pair:
                    new.append(old[j] + old[j + 1])
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            for p in zip(old, old[1:]):
                counts[p] -= 1
                touched.add(p)
            for p in zip(new, new[1:]):
                counts[p] = counts.get(p, 0) + 1
                holders.setdefault(p, set()).add(i)
                touched.add(p)
            seqs[i] = new
        counts.pop(pair, None)
        for p in touched - {pair}:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    return _vocab([merge.replace(" ", "") for merge in merges]), merges


MERGE_RULES = {"ranked": tiny_vocab_and_merges, "learned": learned_vocab_and_merges}


def write_tiny_vocab(folder: str, words: tuple[str, ...] = TINY_WORDS, merges: str = "ranked") -> tuple[str, str]:
    """Write vocab.json and merges.txt into `folder`; return their paths. `merges`: "ranked" (each word's merges
    left to right, longest word first: what builtin:tiny v1 and v2 were built with) or "learned" (every word whole)."""
    if merges not in MERGE_RULES:
        raise ValueError(f"unknown merges rule {merges!r}; use one of {', '.join(MERGE_RULES)}")
    os.makedirs(folder, exist_ok=True)
    vocab, merges = MERGE_RULES[merges](words)
    vocab_path = os.path.join(folder, "vocab.json")
    merges_path = os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return vocab_path, merges_path


def make_tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS, merges: str = "ranked"):
    """A CLIPTokenizer over `words` (default TINY_WORDS) and the byte-level characters: other text goes by
    characters. With merges="learned" every one of `words` is one token; "ranked" splits some (module docstring)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_tiny_vocab(tmp, words, merges)
        return CLIPTokenizer(vocab_path, merges_path, model_max_length=77)


def make_tiny_pipeline(seed: int = 0, text_dim: int = 32):
    """A random-weight 8-channel IP2P pipeline: UNet (32, 64) channels, 2-block VAE, 2-layer CLIP text encoder.

    Deterministic for a given seed. 64x64 images give 8x8 latents; 3 steps take well under a second on CPU.
    """
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = make_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_dim,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        hidden_size=text_dim,
        intermediate_size=4 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    text_encoder = CLIPTextModel(text_config)
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=EulerAncestralDiscreteScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


MADE_BY = "adapterkit make-tiny-base"


def save_tiny_pipeline(output: str, seed: int = 0, overwrite: bool = False) -> str:
    """Save `make_tiny_pipeline(seed)` as a diffusers folder (atomically), loadable by from_pretrained offline. An
    `output` holding anything but an earlier tiny pipeline is refused unless `overwrite` (check_pipeline_replaceable)."""
    from .fileio import BASE_INFO_FILE, atomic_folder, check_pipeline_replaceable

    check_pipeline_replaceable(output, MADE_BY, "the tiny pipeline", overwrite)
    pipe = make_tiny_pipeline(seed=seed)
    with atomic_folder(output) as tmp:
        pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, BASE_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump({"resolution": 64, "made_by": MADE_BY, "seed": seed}, f)
    return output
