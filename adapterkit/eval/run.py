"""`adapterkit eval`: judge adapters and merged adapters side by side on one base, with metrics and image grids.

The rules, in the order they apply:

- **Columns.** "base" (the base alone) is always a column. Each adapter is a column named by its folder (or its
  task, for an in-memory Adapter); names are made file-safe and unique. An adapter whose adapter.json has a
  top-level "merge" entry is a **merged adapter**.
- **Tasks.** The tasks of the plain adapters in the order given, then each merge's source tasks not seen yet.
  A merge source is a task name, or an adapter folder (its adapter.json task, else its folder name).
- **Rows of a task.** `task_rows="match"` selects the task's rows with the data module's task selector
  (`load_edit_dataset(..., task=T)`). `"all"` judges every task on every row (a single-task dataset, or a
  held-out set you want every adapter on). `"auto"` (default) is "all" when the eval has one task and
  "match" when it has several. `limit` keeps the first N rows of each task.
- **Who is judged where.** On task T's rows: the base, every plain adapter of task T, every merge containing T.
- **Same conditions for every column.** Each (task, row) gets one instruction and one seed, `seed + row`, used
  by every column; the sampler settings (steps, guidance, image guidance, resolution) are shared. The
  instruction is the row's own (`instructions="data"`), or the task adapter's stored instructions taken in
  turn (`instructions="adapter"`; also used for rows without an instruction). The input is resized so its
  shorter side is `resolution` (default: the base's own), multiples of 8; the target is resized to the same size.
- **Batches.** `batch_size` (default 8) rows of one (task, column) go through one pipeline call
  (`AdapterBank.edit_batch`: each image with its own seed, as edited alone to within 1/255 per pixel); 1 edits
  them one at a time.
- **Cache.** Each output is cached in `<output>/cache/<key>.png`, the key a hash of the base's weights, the
  column's adapter weights, the input pixels, instruction, seed and sampler settings. A re-run that adds one
  adapter generates only the new column; metrics are always recomputed from the saved PNGs.

Metrics are defined in `eval/metrics.py`, the files written in `eval/report.py`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

from PIL import Image
from tqdm.auto import tqdm

from ..adapters.record import METADATA_FILE as ADAPTER_FILE, Adapter
from ..data.folder import METADATA_FILES
from ..devices import AUTO as AUTO_DEVICE
from ..devices import DEFAULT_DTYPE
from ..devices import record as record_device
from ..errors import AdapterkitError
from ..fileio import atomic_file, atomic_folder
from ..inference import to_rgb
from . import metrics as M
from . import report as R
from .columns import Column, OutputCache, _unique, base_hash, build_columns, image_hash, safe_name
from .rows import TaskRow, load_rows, open_rows

TASK_ROWS = ("auto", "match", "all")
INSTRUCTION_SOURCES = ("data", "adapter")
# Rows per pipeline call: 8 edits of the 64 px base took 1.7-2.2x less time than 8 single calls on 2 CPU cores
# (session 20); a GPU gains more.
DEFAULT_BATCH_SIZE = 8


@dataclass
class EvalResult:
    output: str
    report: dict
    table: str
    generated: int = 0  # pipeline calls made by this run
    cached: int = 0  # outputs taken from the cache
    files: dict = field(default_factory=dict)  # "json", "html", "grids" -> paths


# -------------------------------------------------------------------------------------------------- generation
def _generate_all(bank, columns, rows, cache, keys, settings, images_dir, folders, quiet, batch_size: int = 1) -> None:
    """Every (task, column, row) output into images_dir: from the cache, else the pipeline, `batch_size` rows of one
    (task, column) per call (AdapterBank.edit_batch: each image as edited alone, with its own seed, to within 1/255
    per pixel; 1: one `edit` per image). Column-major per task so each adapter is swapped in once per task."""
    jobs = [(task, column, r) for task in rows for column in columns if task in column.tasks for r in rows[task]]
    # resolution is applied to the inputs beforehand (TaskRow.input); it stays part of the cache key
    sampler = {k: settings[k] for k in ("steps", "guidance", "image_guidance")}
    bar = tqdm(total=len(jobs), desc="eval", unit="image", disable=quiet)
    pending: list = []  # misses of one (task, column), edited together

    def flush():
        task, column = pending[0][0], pending[0][1]
        bar.set_postfix_str(f"{task}/{column.name}", refresh=False)
        for (_, _, r, key), image in zip(pending, _edit_rows(bank, column, [j[2] for j in pending], sampler, batch_size)):
            cache.put(key, image)
            cache.misses += 1
            _save_output(image, r, images_dir, folders[task], column.name)
        bar.update(len(pending))
        pending.clear()

    for task, column, r in jobs:
        if pending and ((pending[0][0], pending[0][1]) != (task, column) or len(pending) >= batch_size):
            flush()
        key = cache.key(base=keys["base"], column=column.content_hash, input=image_hash(r.input),
                        instruction=r.instruction, seed=r.seed, **settings)
        image = cache.get(key)
        if image is None:
            pending.append((task, column, r, key))
            continue
        cache.hits += 1
        _save_output(image, r, images_dir, folders[task], column.name)
        bar.update(1)
    if pending:
        flush()
    bar.close()
    for task, task_rows in rows.items():
        for r in task_rows:
            _save_png(r.input, os.path.join(images_dir, folders[task], "input", f"{r.row}.png"))
            _save_png(r.target, os.path.join(images_dir, folders[task], "target", f"{r.row}.png"))


def _edit_rows(bank, column, task_rows: list, sampler: dict, batch_size: int) -> list:
    """The column's outputs (RGB) for `task_rows`: one `edit` each, or one `edit_batch` for them all."""
    task = None if column.kind == "base" else column.name
    if batch_size == 1:
        images = [bank.edit(r.input, r.instruction, task=task, seed=r.seed, resolution=None, **sampler) for r in task_rows]
    else:
        images = bank.edit_batch([r.input for r in task_rows], [r.instruction for r in task_rows], tasks=[task] * len(task_rows),
                                 seeds=[r.seed for r in task_rows], resolution=None, **sampler)
    return [to_rgb(image) for image in images]


def _save_output(image: Image.Image, r, images_dir: str, folder: str, column: str) -> None:
    if image.size != r.input.size:  # a VAE that rounds sizes differently: compare at the input's size
        image = image.resize(r.input.size, Image.BICUBIC)
    _save_png(image, os.path.join(images_dir, folder, column, f"{r.row}.png"))


def _save_png(image: Image.Image, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, format="PNG")


def _read_png(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------- metrics
@dataclass
class Scorers:
    clip: M.ClipScorer | None
    lpips: M.LpipsScorer | None
    skipped: dict  # metric -> "skipped: reason"


def load_scorers(clip_model: str | None, device) -> Scorers:
    skipped = {}
    clip = M.ClipScorer(clip_model, device=device) if clip_model else None
    if clip is None:
        skipped["clip"] = "skipped: no --clip-model given"
    lpips, reason = M.load_lpips()
    if reason:
        skipped["lpips"] = reason
    return Scorers(clip, lpips, skipped)


def score_task(output: str, folder: str, task_columns: list[Column], rows: list[TaskRow], scorers: Scorers,
               adapter_column: str | None, quiet: bool = False) -> list[dict]:
    """Per-row records {"row", "instruction", "seed", "metrics": {column: {metric: value}}, "vs_task_adapter"},
    computed from the saved PNGs."""
    records, directions = [], {}
    for r in tqdm(rows, desc=f"score {folder}", unit="row", disable=quiet):
        path = lambda column: os.path.join(output, "images", folder, column, f"{r.row}.png")  # noqa: E731
        source, target = _read_png(path("input")), _read_png(path("target"))
        outputs = {c.name: _read_png(path(c.name)) for c in task_columns}
        per_column = {name: {"psnr": M.psnr(target, im), "ssim": M.ssim(target, im), "l1": M.l1(target, im)} for name, im in outputs.items()}
        if scorers.lpips is not None:
            for name, im in outputs.items():
                per_column[name]["lpips"] = scorers.lpips(target, im)
        if scorers.clip is not None:
            _clip_scores(scorers.clip, source, outputs, r.instruction, directions, per_column)
        vs = {}
        if adapter_column is not None:
            vs = {c.name: M.psnr(outputs[adapter_column], outputs[c.name]) for c in task_columns if c.kind == "merge"}
        records.append({"row": r.row, "source_row": r.source_row, "instruction": r.instruction, "seed": r.seed, "metrics": per_column, "vs_task_adapter": vs})
    return records


def _clip_scores(clip: M.ClipScorer, source, outputs: dict, instruction: str, directions: dict, per_column: dict) -> None:
    if instruction not in directions:
        directions[instruction] = clip.caption_direction(instruction)
    names = list(outputs)
    features = clip.image_features([source] + [outputs[n] for n in names])  # (1 + columns, d)
    for name, feature in zip(names, features[1:]):
        per_column[name]["clip_image"] = M.clip_image_similarity(features[0], feature)
        per_column[name]["clip_direction"] = M.clip_directional_similarity(features[0], feature, directions[instruction])


# ------------------------------------------------------------------------------------------------------ report
def build_report(base, data: str, data_options: dict, settings: dict, seed: int, columns: list[Column],
                 sections: dict, skipped: dict, cache: OutputCache) -> dict:
    return {
        "format": R.REPORT_FORMAT,
        "base": {"name_or_path": base.name_or_path, "fingerprint": base.fingerprint},
        "data": {"source": data, **{k: v for k, v in data_options.items()}},
        "generation": {**settings, "seed": seed, "seed_rule": "seed + row"},
        "captions": {"before": M.CAPTION_BEFORE, "after": M.CAPTION_AFTER},
        "columns": [_column_record(c) for c in columns],
        "tasks": sections,
        "skipped": skipped,
        "cache": {"generated": cache.misses, "cached": cache.hits},
    }


def _column_record(column: Column) -> dict:
    record = {"name": column.name, "kind": column.kind, "tasks": column.tasks, "content_hash": column.content_hash}
    if column.adapter is not None:
        record.update(task=column.adapter.task, method=column.adapter.method, path=column.adapter.path)
    if column.kind == "merge":
        record["merge_method"] = column.adapter.merge.method
    return record


def task_section(task: str, folder: str, task_columns: list[Column], records: list[dict]) -> dict:
    names = [c.name for c in task_columns]
    summary = R.summarise_task(records, names)
    adapter_column = next((c.name for c in task_columns if c.kind == "adapter"), None)
    merges = {c.name: R.merge_view(records, summary, c.name, adapter_column) for c in task_columns if c.kind == "merge"}
    folders = {name: name for name in ["input", "target"] + names}
    return {"n_rows": len(records), "folder": folder, "folders": folders, "columns": names, "metrics": summary,
            "merges": merges, "rows": records}


# -------------------------------------------------------------------------------------------------- evaluate
def evaluate(
    base,
    data: str,
    adapters: list,
    output: str,
    *,
    preset: str | None = None,
    input_column: str | None = None,
    target_column: str | None = None,
    instruction_column: str | None = None,
    split: str = "train",
    limit: int | None = None,
    task_rows: str = "auto",
    instructions: str = "data",
    steps: int | None = None,
    guidance: float | None = None,
    image_guidance: float | None = None,
    seed: int = 0,
    resolution: int | None = None,
    clip_model: str | None = None,
    force: bool = False,
    device: str = AUTO_DEVICE,
    dtype: str = DEFAULT_DTYPE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    overwrite: bool = False,
    quiet: bool = False,
) -> EvalResult:
    """Judge `adapters` (folders or Adapter objects; merged ones included) against the base on `data`.

    `base` is a name/path for `load_base` or a loaded Base (not modified once the eval returns). Writes report.json,
    report.html, grids/<task>.png, images/<task>/<column>/<row>.png (an images/ holding other files is refused unless
    `overwrite`) and cache/ under `output`. Sampler settings left at None: the base's recorded defaults, else 20 / 7
    / 1.5. `batch_size`: rows of one column per call (module docstring). `device` / `dtype` (devices.py, for a base
    given by name): auto is the GPU when torch sees one, else the CPU; float32 unless asked."""
    _check_options(task_rows, instructions, limit, output, batch_size, overwrite)
    columns, tasks = build_columns(list(adapters))
    data_options = {"preset": preset, "input_column": input_column, "target_column": target_column,
                    "instruction_column": instruction_column, "split": split}
    loaded = _load_base(base, device, dtype)
    resolution, dataset = resolution or loaded.resolution, open_rows(data, data_options, instructions)
    rows, left_out = load_rows(dataset, tasks, columns, data_options, task_rows, limit, instructions, resolution, seed)
    tasks = [t for t in tasks if t in rows]
    scorers = load_scorers(clip_model, str(loaded.pipe.device))
    keys = {"base": base_hash(loaded.pipe)}  # before any adapter touches the weights (its dtype is in the hash)
    bank = _make_bank(loaded, columns, force)
    sampler = loaded.sampler(steps, guidance, image_guidance)  # issue 18: the base's own defaults unless given
    settings, folders = _generation_settings(loaded, sampler, resolution), _task_folders(tasks)
    cache = OutputCache(os.path.join(output, "cache"))
    try:
        with atomic_folder(os.path.join(output, "images")) as images_dir:
            _generate_all(bank, columns, rows, cache, keys, settings, images_dir, folders, quiet, batch_size)
    finally:
        bank.close()  # the caller's Base is left as it came (no live LoRA slot): it can be evaluated again
    sections = _score_all(output, tasks, columns, rows, folders, scorers, quiet)
    # issue 19: the split and file actually read (a demo-data eval folder read with the default --split train is split eval)
    data_options.update(split=dataset.split, requested_split=split, read_from=dataset.read_from, limit=limit,
                        task_rows=task_rows, instructions=instructions)
    report = build_report(loaded, data, data_options, {**settings, "sampler_source": dict(sampler.source)}, seed, columns,
                          sections, {**scorers.skipped, **{f"task {t}": why for t, why in left_out.items()}}, cache)
    return _write_outputs(output, report, cache)


def _load_base(base, device: str, dtype: str):
    """A Base given is used as it is; a name is loaded on `device` in `dtype` (devices.py; a bad device fails here,
    before the load)."""
    from ..base import Base, load_base
    from ..devices import placement

    if isinstance(base, Base):
        return base
    device, dtype = placement(device, dtype)
    return load_base(base, dtype=dtype, device=device)


def _generation_settings(loaded, sampler, resolution: int) -> dict:
    """What decides every output besides its row, all part of every cache key: the sampler settings, the resolution,
    and the kind of device and dtype (an output made on another device, other kernels and last bits, is not reused;
    the dtype is in the base's hash as well)."""
    return {**sampler.options(), "resolution": resolution, **record_device(loaded.pipe)}


def _make_bank(loaded, columns: list[Column], force: bool):
    """An AdapterBank on the base holding every adapter column under the column's name."""
    from ..adapters.bank import AdapterBank

    bank = AdapterBank(loaded, force=force)
    for column in columns[1:]:
        bank.add(Adapter(**{**column.adapter.__dict__, "task": column.name}))
    return bank


def _score_all(output: str, tasks: list[str], columns: list[Column], rows: dict, folders: dict, scorers: Scorers,
               quiet: bool) -> dict:
    """task -> report section, scored from the saved PNGs."""
    sections = {}
    for task in tasks:
        task_columns = [c for c in columns if task in c.tasks]
        adapter_column = next((c.name for c in task_columns if c.kind == "adapter"), None)
        records = score_task(output, folders[task], task_columns, rows[task], scorers, adapter_column, quiet)
        sections[task] = task_section(task, folders[task], task_columns, records)
    return sections


def _check_options(task_rows: str, instructions: str, limit: int | None, output: str, batch_size: int, overwrite: bool) -> None:
    if task_rows not in TASK_ROWS:
        raise AdapterkitError(f"task_rows must be one of {', '.join(TASK_ROWS)}, got '{task_rows}'")
    if instructions not in INSTRUCTION_SOURCES:
        raise AdapterkitError(f"instructions must be one of {', '.join(INSTRUCTION_SOURCES)}, got '{instructions}'")
    if limit is not None and limit < 1:
        raise AdapterkitError(f"--limit must be at least 1, got {limit}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AdapterkitError(f"--batch-size must be a whole number of at least 1, got {batch_size!r}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise AdapterkitError(f"output {output} exists and is not a folder; choose a folder path")
    if not overwrite:
        _check_not_another_kind(output)
        _check_images_folder(os.path.join(output, "images"))


# A folder holding one of these is an adapter, a pipeline or a dataset: eval's report would be mixed into it.
_OTHER_KINDS = {ADAPTER_FILE: "an adapter", "model_index.json": "a diffusers pipeline",
                **{name: "a dataset" for name in (*METADATA_FILES, "dataset_info.json", "dataset_dict.json")}}


def _check_not_another_kind(output: str) -> None:
    """Session 23: `--output adapters/derain` (the --adapter pasted once more) wrote report.json, report.html, grids/,
    images/ and cache/ into the adapter's folder, and a later `train` there refused for the files added beside it."""
    found = next((name for name in _OTHER_KINDS if os.path.isfile(os.path.join(output, name))), None)
    if found is not None:
        raise AdapterkitError(f"--output {output} is {_OTHER_KINDS[found]} ({found}); eval would write its report, "
                              "grids, images and cache into it: choose another --output, or pass --overwrite")


# images/<task folder>/<column>/<row>.png: all an earlier eval leaves in images/ (the column names are safe_name'd)
_OWN_IMAGE = re.compile(r"\d+\.png")


def _check_images_folder(images: str) -> None:
    """eval replaces OUTPUT/images whole: refuse one holding anything an earlier eval did not write (session 22:
    `eval --data D --output D` deleted a dataset that kept its pictures in D/images/)."""
    found = []
    for root, dirs, files in os.walk(images):
        depth = os.path.relpath(root, images).count(os.sep) + (root != images)
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and (depth < 2 or not _OWN_IMAGE.fullmatch(f))]
        found += [os.path.join(root, d) for d in sorted(dirs) if depth >= 2 and not d.startswith(".")]
        if found:
            shown = ", ".join(os.path.relpath(f, images) for f in found[:3]) + (", ..." if len(found) > 3 else "")
            raise AdapterkitError(f"{images} holds files an earlier eval did not write ({shown}); eval replaces that "
                                  "folder with its outputs: choose another --output, or pass --overwrite")


def _task_folders(tasks: list[str]) -> dict[str, str]:
    used: set[str] = set()
    return {task: _unique(safe_name(task), used) for task in tasks}


def _write_outputs(output: str, report: dict, cache: OutputCache) -> EvalResult:
    json_path, html_path = os.path.join(output, "report.json"), os.path.join(output, "report.html")
    with atomic_file(json_path, "w") as f:  # insertion order kept: tasks and columns in the order evaluated
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
    R.write_html(html_path, report)
    grids = {}
    for task, section in report["tasks"].items():
        grids[task] = os.path.join(output, "grids", f"{section['folder']}.png")
        R.write_grid(grids[task], *R.grid_rows(output, section))
    return EvalResult(output=output, report=report, table=R.format_table(report), generated=cache.misses,
                      cached=cache.hits, files={"json": json_path, "html": html_path, "grids": grids})
