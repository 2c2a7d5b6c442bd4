"""Procedural edit tasks: (input, instruction, target) triples made from natural-image crops and drawn pictures.

A task turns a clean picture (`pictures.clean_picture`) into (input, target) with one of `edits`:
- general edits (`GENERAL_TASKS`): the target is the clean picture edited (brighter, sepia, outlines drawn, ...).
  The bundled tiny base (`builtin:tiny`) is trained on these.
- held-out tasks (`HELDOUT_TASKS`): the input is the clean picture degraded (rain, noise, low light) or the target
  is it restyled (cartoon). The base never sees them; adapters learn them.

Each task has stored phrasings (`instructions`: datasets, adapters and merges use them) and phrasings that are
never stored anywhere (`unseen_instructions`: probes for routing and for merges on instructions they never saw).
Everything is a pure function of (task, seed, split, row index, resolution): row i is the same whatever n is, and
row i of two tasks starts from the same clean picture.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from ..errors import AdapterkitError
from ..eval.metrics import psnr  # noqa: F401  (re-exported)
from . import edits
from .imageops import gaussian_blur, luminance  # noqa: F401  (re-exported: tests and scripts use them from here)
from .pictures import (  # noqa: F401  (re-exported)
    EVAL_SOURCES, SOURCE_BANK_FILE, SPLITS, check_split, clean_picture, source_bank_path, source_images,
)

DATASET_INFO_FILE = "task.json"
Edit = Callable[[np.ndarray, np.random.Generator], "tuple[np.ndarray, np.ndarray]"]


@dataclass(frozen=True)
class Task:
    """A named edit: its phrasings and how to make (input, target) from a clean picture."""

    name: str
    kind: str  # "general" (the base learns it) or "heldout" (adapters learn it)
    instructions: tuple[str, ...]  # stored phrasings: datasets, adapters and merges use these
    make_pair: Edit  # (clean, rng) -> (input, target), both float32 (H, W, 3) in [0, 1]
    description: str
    unseen_instructions: tuple[str, ...] = ()  # never in a dataset or an adapter: routing and merge probes


def _task(name, kind, make_pair, description, instructions, unseen=()) -> Task:
    return Task(name=name, kind=kind, instructions=tuple(instructions), make_pair=make_pair, description=description,
                unseen_instructions=tuple(unseen))


_ALL = (
    _task("brighter", "general", edits.brighter, "gamma 0.5",
          ("make it brighter", "brighten the image", "make the photo brighter", "increase the brightness", "brighten it"),
          ("lighten the picture",)),
    _task("darker", "general", edits.darker, "gamma 2.0",
          ("make it darker", "darken the image", "make the photo darker", "reduce the brightness", "darken it"),
          ("make the picture dim",)),
    _task("contrast", "general", edits.more_contrast, "contrast x1.8 around the mean luma",
          ("add more contrast", "increase the contrast", "make the contrast stronger", "more contrast please",
           "boost the contrast"), ("give the picture more punch",)),
    _task("grayscale", "general", edits.grayscale, "Rec. 601 luma",
          ("make it grayscale", "convert to black and white", "turn the photo gray", "remove the colors",
           "make it black and white"), ("desaturate it completely",)),
    _task("hue", "general", edits.hue_shift, "YIQ chroma rotated by 120 degrees",
          ("shift the hue", "rotate the hue", "change the hue of the colors", "shift the colors", "hue shift the image"),
          ("swap the colors around",)),
    _task("invert", "general", edits.invert, "1 - x",
          ("invert the colors", "invert the image", "make a negative", "turn it into a negative", "invert the photo"),
          ("make it look like a film negative",)),
    _task("posterize", "general", edits.posterize, "4 levels per channel",
          ("posterize the image", "posterize it", "reduce the number of colors", "make it look like a poster",
           "posterize the photo"), ("use only a few colors",)),
    _task("sepia", "general", edits.sepia, "classic sepia matrix",
          ("apply a sepia filter", "make it sepia", "sepia tone the photo", "give it a sepia look",
           "make it look old and brown"), ("give it an antique tint",)),
    _task("saturate", "general", edits.saturate, "chroma x1.8 around each pixel's luma",
          ("saturate the colors", "make the colors vivid", "increase the saturation", "make it more colorful",
           "boost the saturation"), ("make the colors pop",)),
    _task("warmer", "general", edits.warmer, "red x1.15, blue x0.8",
          ("make it warmer", "warm up the colors", "give it a warm tone", "make the light warmer", "warm the photo"),
          ("add a golden tint",)),
    _task("blur", "general", edits.blur, "Gaussian, sigma 1.5 px at 64 px",
          ("blur the image", "make it blurry", "add blur", "blur the photo", "soften the image"),
          ("make it out of focus",)),
    _task("sharpen", "general", edits.sharpen, "unsharp mask, amount 1.5, sigma 1 px at 64 px",
          ("sharpen the image", "make it sharper", "sharpen the photo", "add sharpness", "make the edges sharp"),
          ("make it crisper",)),
    _task("smooth", "general", edits.smooth_keep_edges, "one bilateral pass (radius 2 px, sigma 1.5 px, colour 0.1)",
          ("smooth the image but keep the edges", "smooth it keeping the edges", "apply edge preserving smoothing",
           "smooth the flat areas", "smooth the photo and keep edges sharp"), ("even out the surfaces",)),
    _task("median", "general", edits.median_filter, "3x3 median filter",
          ("apply a median filter", "remove the small details", "median filter the image", "remove the fine details",
           "median filter it"), ("get rid of the tiny specks",)),
    _task("outline", "general", edits.outline, "dark lines over strong Sobel edges of the luma",
          ("draw the outlines", "outline the edges", "draw dark lines on the edges", "ink the outlines",
           "draw the edges in black"), ("trace the contours",)),
    _task("pixelate", "general", edits.pixelate, "4x4 px blocks at 64 px, mean colour",
          ("pixelate the image", "pixelate it", "make it blocky", "turn it into big pixels", "pixelate the photo"),
          ("make it look like a mosaic",)),
    _task("derain", "heldout", edits.derain, "input: slanted rain streaks screen-blended in; target: the clean picture",
          ("derain the image", "remove the rain", "remove the rain streaks", "clear the rain from the photo",
           "derain this photo"),
          ("get rid of the rain", "take away the raindrops", "erase the rain streaks", "undo the rain")),
    _task("cartoonize", "heldout", edits.cartoonize,
          "target: 2x bilateral smoothing, 5-level colour quantisation, dark Sobel outlines",
          ("cartoonize the image", "make it a cartoon", "turn the photo into a cartoon", "cartoonize it",
           "give it a cartoon style"),
          ("make it look like a cartoon", "turn this into a cartoon drawing", "cartoon style please",
           "render it as a cartoon")),
    _task("denoise", "heldout", edits.denoise, "input: Gaussian noise, sigma 0.06-0.12; target: the clean picture",
          ("denoise the image", "remove the noise", "clean up the noise", "make it less noisy", "denoise the photo"),
          ("get rid of the noise", "take the grain out", "reduce the noise please", "make it clean and not noisy")),
    _task("lowlight", "heldout", edits.lowlight,
          "input: gamma 1.8-2.6, exposure x0.45-0.75, noise sigma 0.01-0.03; target: the clean picture",
          ("enhance the low light image", "fix the low light photo", "correct the underexposed photo",
           "restore the lowlight image", "lowlight enhance the picture"),
          ("fix this underexposed picture", "recover the dark photo", "enhance the lowlight photo",
           "repair the low light picture")),
)
TASKS: dict[str, Task] = {t.name: t for t in _ALL}
GENERAL_TASKS = tuple(t.name for t in _ALL if t.kind == "general")
HELDOUT_TASKS = tuple(t.name for t in _ALL if t.kind == "heldout")
# Text that names no task: routing must send it to the base.
UNRELATED_INSTRUCTIONS = ("what a nice day", "a cat on the sofa", "hello there", "the quick brown fox",
                          "print the report", "zoom out a little", "add a dog in the corner", "rotate it by ninety")


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AdapterkitError(f"unknown task '{name}'; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------- examples and datasets


@dataclass
class Example:
    input: np.ndarray  # uint8 (H, W, 3)
    instruction: str
    target: np.ndarray  # uint8 (H, W, 3)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def _row_rng(task: str, index: int, seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index, zlib.crc32(task.encode())])


def make_example(task: str, index: int, seed: int = 0, resolution: int = 64, split: str = "train",
                 unseen: bool = False) -> Example:
    """Row `index` of a task: deterministic in (task, index, seed, resolution, split).

    `unseen=True` gives the same picture pair with one of the task's never-stored phrasings instead.
    """
    spec = get_task(task)
    check_split(split)
    clean = clean_picture(index, seed, resolution, split).astype(np.float32)
    rng = _row_rng(spec.name, index, seed, split)
    source, target = spec.make_pair(clean, rng)
    instruction = spec.instructions[int(rng.integers(len(spec.instructions)))]
    if unseen and spec.unseen_instructions:
        instruction = spec.unseen_instructions[index % len(spec.unseen_instructions)]
    return Example(input=_to_uint8(source), instruction=instruction, target=_to_uint8(target))


def make_examples(task: str, n: int, seed: int = 0, resolution: int = 64, split: str = "train", start: int = 0,
                  unseen: bool = False):
    return [make_example(task, i, seed, resolution, split, unseen) for i in range(start, start + n)]


def rain_mask(index: int, seed: int = 0, resolution: int = 64, split: str = "eval", threshold: float = 0.1) -> np.ndarray:
    """(H, W) bool: where derain row `index` has rain (the streak layer its generator drew, above `threshold`).

    Replays the row's generator: `edits.derain` draws the streak layer first, then its strength.
    """
    rng = _row_rng("derain", index, seed, split)
    streaks = edits.rain_streaks((resolution, resolution), rng) * rng.uniform(0.6, 0.9)
    return streaks > threshold


def _check_dataset_args(task: str, n: int, resolution: int, split: str) -> None:
    get_task(task)
    check_split(split)
    if n < 1:
        raise AdapterkitError(f"the number of rows must be at least 1 (got {n})")
    if resolution < 16 or resolution % 8:
        raise AdapterkitError(f"the resolution must be a multiple of 8, at least 16 (got {resolution})")


# What write_task_dataset puts in its folder: an earlier dataset holding only these is replaced whole.
DATASET_ENTRIES = frozenset({"input", "edited", "metadata.jsonl", DATASET_INFO_FILE})


def _check_dataset_folder(output: str) -> None:
    """The folder is replaced whole: refuse one holding anything but an earlier demo-data dataset (session 21:
    `demo-data --output adapters/derain` deleted the adapter), or an earlier dataset with files added to it
    (session 22: an adapter trained into data/derain/adapter would have gone with it)."""
    from ..fileio import foreign_entries

    shown = foreign_entries(output, DATASET_ENTRIES if os.path.isfile(os.path.join(output, DATASET_INFO_FILE)) else frozenset())
    if shown:
        raise AdapterkitError(f"{output} holds files that are not a demo-data dataset ({shown}); writing the dataset "
                              "there would delete them: choose another --output, or delete them first")


def write_task_dataset(
    task: str | Sequence[str], output: str, n: int = 200, seed: int = 0, resolution: int = 64, split: str = "train",
    quiet: bool = False,
) -> str:
    """Write `n` rows of `task` (or `n` rows of each of several tasks) as an imagefolder dataset, atomically.

    Layout: `input/00000.png`, `edited/00000.png` (several tasks: `input/derain-00000.png`, ...), `metadata.jsonl`
    rows `{"input_image_file_name", "edited_image_file_name", "edit_prompt"}` (datasets' imagefolder turns them into
    the columns `input_image`, `edited_image`, `edit_prompt`: diffusers' IP2P script defaults), and `task.json`
    (task(s), instructions, seed, split). Returns `output`.
    """
    from tqdm.auto import tqdm

    from ..fileio import atomic_folder

    names = [task] if isinstance(task, str) else list(task)
    if not names:
        raise AdapterkitError("name at least one task to write")
    for name in names:
        _check_dataset_args(name, n, resolution, split)
    _check_dataset_folder(output)
    jobs = [(name, i) for name in names for i in range(n)]
    with atomic_folder(output) as tmp:
        os.makedirs(os.path.join(tmp, "input"))
        os.makedirs(os.path.join(tmp, "edited"))
        rows = []
        for name, i in tqdm(jobs, desc=f"writing {', '.join(names)}", disable=quiet):
            ex = make_example(name, i, seed, resolution, split)
            file = f"{i:05d}.png" if len(names) == 1 else f"{name}-{i:05d}.png"
            Image.fromarray(ex.input).save(os.path.join(tmp, "input", file))
            Image.fromarray(ex.target).save(os.path.join(tmp, "edited", file))
            rows.append({"input_image_file_name": f"input/{file}", "edited_image_file_name": f"edited/{file}",
                         "edit_prompt": ex.instruction})
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        with open(os.path.join(tmp, DATASET_INFO_FILE), "w", encoding="utf-8") as f:
            json.dump(_dataset_info(names, n, seed, split, resolution), f, indent=2)
    return output


def _dataset_info(names: list[str], n: int, seed: int, split: str, resolution: int) -> dict:
    """task.json: one task's description, or a list of them for a multi-task folder."""
    specs = [{"task": t, "kind": TASKS[t].kind, "description": TASKS[t].description,
              "instructions": list(TASKS[t].instructions)} for t in names]
    common = {"rows": n, "seed": seed, "split": split, "resolution": resolution}
    return {**specs[0], **common} if len(specs) == 1 else {"tasks": specs, "rows_per_task": n, **common}


# ---------------------------------------------------------------- scoring a base on tasks

# ---------------------------------------------------------------- scoring a base on tasks


def score_task(
    pipe, task: str, n: int = 8, seed: int = 0, resolution: int = 64, split: str = "eval", steps: int = 20,
    guidance: float = 7.0, image_guidance: float = 1.5, batch_size: int = 8,
) -> dict:
    """Mean PSNR to the target of the unedited input and of the pipeline's output, over `n` rows of `split`.

    Rows are edited in batches with `generator=torch.Generator("cpu").manual_seed(seed + first row)`.
    Returns {"task", "psnr_input", "psnr_output", "gain", "n"}.
    """
    import torch

    examples = make_examples(task, n, seed, resolution, split)
    psnr_in, psnr_out = [], []
    for start in range(0, n, batch_size):
        batch = examples[start : start + batch_size]
        with torch.no_grad():
            out = pipe(
                prompt=[ex.instruction for ex in batch],
                image=[Image.fromarray(ex.input) for ex in batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                image_guidance_scale=image_guidance,
                generator=torch.Generator("cpu").manual_seed(seed + start),
                output_type="np",
            ).images  # (B, H, W, 3) float in [0, 1]
        for ex, edited in zip(batch, out):
            psnr_in.append(psnr(ex.input, ex.target))
            psnr_out.append(psnr(_to_uint8(edited), ex.target))
    result = {"task": task, "psnr_input": float(np.mean(psnr_in)), "psnr_output": float(np.mean(psnr_out)), "n": n}
    result["gain"] = result["psnr_output"] - result["psnr_input"]
    return result


def format_scores(scores: list[dict]) -> str:
    """A plain-text table of `score_task` results."""
    lines = [f"{'task':<12} {'PSNR input':>10} {'PSNR base':>10} {'gain dB':>8}"]
    for s in scores:
        lines.append(f"{s['task']:<12} {s['psnr_input']:>10.2f} {s['psnr_output']:>10.2f} {s['gain']:>+8.2f}")
    return "\n".join(lines)
