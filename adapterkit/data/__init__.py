"""Edit datasets: (input image, target image, instruction) rows from the hub, a save_to_disk folder, or a local folder.

Sources
- a local folder with `metadata.jsonl` or `metadata.csv` (or in `<split>/`), datasets' imagefolder convention
  (folder.py), images decoded lazily.
- a `datasets.save_to_disk` folder (Dataset or DatasetDict), or a hub dataset id (`datasets.load_dataset`).

Columns come from a preset (`PRESETS`) or explicit names; with neither, the first preset whose three columns the
dataset has. `task=` keeps only one task's rows of a multi-task dataset (see `task_matches`).

Unreadable rows (a missing, truncated or non-image file) are skipped and counted in `EditDataset.skipped`:
iteration yields only readable rows; `dataset[i]` on an unreadable row returns the next readable row instead.

This is the data floor: train, eval, edit and serve read datasets through it, never through each other. Turning
examples into training tensors is train/batches.py's job.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from PIL import Image

from ..errors import AdapterkitError, first_line
from ..inference import read_rgb, to_rgb
from .folder import SPLIT_INFO_FILE, FolderTable, Unreadable, metadata_file, top_level_split  # noqa: F401 (SPLIT_INFO_FILE: demo, tests)

# preset -> (input column, target column, instruction column)
PRESETS = {
    "ip2p": ("input_image", "edited_image", "edit_prompt"),  # diffusers' train_instruct_pix2pix.py defaults
    "cartoonization": ("original_image", "cartoonized_image", "edit_prompt"),  # instruction-tuning-sd/cartoonization
    "low-level": ("input_image", "ground_truth_image", "instruction"),  # instruction-tuning-sd/low-level-image-proc
}
# Tasks of the low-level set (and cartoonization): a row belongs to a task when its instruction contains one of the
# task's keywords and no keyword of another task here ("deblur and denoise the image" belongs to neither).
# Any other task name matches rows whose instruction contains the name itself. Matching ignores case.
TASK_KEYWORDS = {
    "derain": ("derain", "rain"),
    "deblur": ("deblur", "blur", "sharpen"),
    "denoise": ("denoise", "noise", "noisy"),
    "lowlight": ("low-light", "low light", "lowlight", "enhance", "brighten", "illuminat"),
    "cartoonize": ("cartoon",),
}
TASK_ALIASES = {"low-light": "lowlight", "enhance": "lowlight", "cartoonization": "cartoonize"}

@dataclass
class EditExample:
    input: Image.Image  # RGB
    target: Image.Image  # RGB
    instruction: str


@dataclass
class EditDataset:
    """Rows of an edit dataset, decoded on access. `rows[i]` is the source row behind index i."""

    source: str
    columns: list[str]  # every column the source has
    input_column: str
    target_column: str
    instruction_column: str | None
    rows: list[int]
    instructions: list[str]  # instruction of each index (no image decoding), "" without an instruction column
    _read: object = field(repr=False, default=None)  # callable(row, column) -> raw image value
    skipped: dict[int, str] = field(default_factory=dict)  # source row -> why it was unreadable
    dropped: dict[int, str] = field(default_factory=dict)  # source row -> why it was left out when loading
    source_rows: int = 0  # rows of the split read, before the task selector, `limit` and dropped rows
    split: str = "train"  # the split actually read (a folder's one split is named by its task.json, if any)
    read_from: str = ""  # what was read: the metadata.jsonl file, or the save_to_disk folder / hub id

    def __len__(self) -> int:
        return len(self.rows)

    def get(self, i: int) -> EditExample | None:
        """Index i decoded to RGB images, or None (counted in `skipped`) when either image is unreadable."""
        row = self.rows[i]
        if row in self.skipped:
            return None
        try:
            images = [_decode(self._read(row, column)) for column in (self.input_column, self.target_column)]
        except Unreadable as e:
            self.skipped[row] = str(e)
            return None
        return EditExample(input=images[0], target=images[1], instruction=self.instructions[i])

    def __getitem__(self, i: int) -> EditExample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} rows")
        i %= len(self)
        for k in range(len(self)):
            example = self.get((i + k) % len(self))
            if example is not None:
                return example
        raise AdapterkitError(f"no row of {self.source} has readable images ({len(self.skipped)} skipped); check the image files")

    def __iter__(self):
        for i in range(len(self)):
            example = self.get(i)
            if example is not None:
                yield example


def load_edit_dataset(
    source: str,
    *,
    preset: str | None = None,
    input_column: str | None = None,
    target_column: str | None = None,
    instruction_column: str | None = None,
    split: str = "train",
    task: str | None = None,
    limit: int | None = None,
    require_instruction: bool = True,
) -> EditDataset:
    """Open an edit dataset and resolve its columns; nothing is decoded yet.

    `task` keeps the rows of one task (`task_matches`); `limit` then keeps the first `limit` rows.
    `require_instruction=True` drops rows whose instruction is empty or null (counted in `dropped`): trained on
    "", an adapter would learn the edit for the empty prompt that guidance uses as its unconditional branch.
    `require_instruction=False` accepts a dataset without an instruction column (instructions become "").
    """
    table = _open_source(source, split)
    if table.num_rows == 0:
        raise AdapterkitError(
            f"dataset {source} (split {split}) has no rows; add rows (see the README for the format) or pass another --data"
        )
    names = _resolve_columns(table.columns, source, preset, input_column, target_column, instruction_column, require_instruction)
    instructions = table.strings(names[2]) if names[2] else [""] * table.num_rows
    rows = list(range(table.num_rows))
    dropped = {}
    if require_instruction and not task:  # (a task's rows all hold its name or keywords)
        dropped = {r: f"empty instruction in column {names[2]}" for r in rows if not instructions[r].strip()}
        rows = [r for r in rows if r not in dropped]
        if not rows:
            raise AdapterkitError(
                f"every row of {source} has an empty instruction in column '{names[2]}'; fill it, pass --instruction-column, "
                "or give the instructions another way (train: --instructions FILE or --instruction TEXT; eval: --instructions adapter)"
            )
    if task:
        rows = [r for r in rows if task_matches(instructions[r], task)]
        if not rows:
            sample = sorted(set(instructions))[:5]
            raise AdapterkitError(
                f"no row of {source} matches task '{task}' (instructions look like: {sample}); check --data-task "
                f"(known tasks: {', '.join(TASK_KEYWORDS)})"
            )
    if limit is not None:
        rows = rows[:limit]
    if not rows:
        raise AdapterkitError(f"dataset {source} (split {split}) has no rows")
    return EditDataset(
        source=source, columns=table.columns, input_column=names[0], target_column=names[1], instruction_column=names[2],
        rows=rows, instructions=[instructions[r] for r in rows], _read=table.read, dropped=dropped,
        source_rows=table.num_rows, split=table.split, read_from=table.read_from,
    )


def task_matches(instruction: str, task: str) -> bool:
    """Does this instruction belong to `task`? Known tasks by keywords (TASK_KEYWORDS), others by their name."""
    text = instruction.lower()
    name = TASK_ALIASES.get(task.lower(), task.lower())
    if name not in TASK_KEYWORDS:
        return name in text
    hits = {t for t, words in TASK_KEYWORDS.items() if any(w in text for w in words)}
    return hits == {name}


def _resolve_columns(columns, source, preset, input_column, target_column, instruction_column, require_instruction):
    if preset is not None and preset not in PRESETS:
        raise AdapterkitError(f"unknown preset '{preset}'; use one of {', '.join(PRESETS)}")
    if preset is None:
        preset = next((p for p, cols in PRESETS.items() if all(c in columns for c in cols[:2])), "ip2p")
    defaults = PRESETS[preset]
    chosen = [input_column or defaults[0], target_column or defaults[1], instruction_column or defaults[2]]
    roles = ("input", "target", "instruction")
    flags = ("--input-column", "--target-column", "--instruction-column")
    missing = []  # every missing column in one message: one at a time took a run per column (session 23)
    for k, (name, role, flag) in enumerate(zip(chosen, roles, flags)):
        if name in columns:
            continue
        if role == "instruction" and not require_instruction and instruction_column is None:
            chosen[k] = None
            continue
        missing.append((name, role, flag))
    if missing:
        what = " and ".join(f"no {role} column '{name}'" for name, role, _flag in missing)
        raise AdapterkitError(
            f"dataset {source} has {what}; available columns: {', '.join(columns)}; "
            f"pass {' and '.join(flag for _n, _r, flag in missing)}, or --preset ({', '.join(PRESETS)})"
        )
    return chosen


# ------------------------------------------------------------------------------------------------ sources
class _DatasetsTable:
    """A datasets.Dataset; image columns are read undecoded ({"bytes", "path"}) so bad files can be skipped."""

    def __init__(self, ds, split: str, read_from: str):
        self.ds = ds
        self.split, self.read_from = split, read_from
        self.columns = list(ds.column_names)
        self.num_rows = len(ds)
        self._views = {}

    def strings(self, column: str) -> list[str]:
        return [str(v or "") for v in list(self.ds[column])]

    def read(self, row: int, column: str):
        import datasets

        if column not in self._views:
            view = self.ds.select_columns([column])
            if isinstance(view.features[column], datasets.Image):
                view = view.cast_column(column, datasets.Image(decode=False))
            self._views[column] = view
        return self._views[column][row][column]


def _open_source(source: str, split: str):
    if os.path.isdir(source):
        split_metadata = metadata_file(os.path.join(source, split))
        top_metadata = metadata_file(source)
        if split_metadata:
            return FolderTable(split_metadata, split)
        if top_metadata:
            return FolderTable(top_metadata, top_level_split(source, split, os.path.basename(top_metadata)))
        if any(os.path.isfile(os.path.join(source, n)) for n in ("dataset_dict.json", "state.json")):
            return _DatasetsTable(_load_from_disk(source, split), split, source)
        raise AdapterkitError(
            f"{source} is neither a folder with metadata.jsonl or metadata.csv (or in {split}/) nor a "
            "datasets.save_to_disk folder; write metadata.jsonl with one line per pair, e.g. {\"input_image_file_name\": "
            "\"in/1.png\", \"edited_image_file_name\": \"out/1.png\", \"edit_prompt\": \"derain the image\"} (paths "
            "relative to the folder), or see `adapterkit demo-data` for a folder in that format"
        )
    if os.path.exists(source):
        raise AdapterkitError(f"dataset {source} is not a folder; pass a dataset folder or a hub dataset id")
    check_path_exists(source)
    return _DatasetsTable(_load_from_hub(source, split), split, source)


def check_path_exists(source: str) -> None:
    """Refuse a path-like `source` (`looks_like_path`) that does not exist, before any hub lookup: a mistyped folder
    used to go to the hub (5 retries, 28 s) before failing (issue 19). Cheap: the CLI calls it before importing torch."""
    if not os.path.exists(source) and looks_like_path(source):
        raise AdapterkitError(
            f"dataset {source} is not a folder (nothing at {os.path.abspath(os.path.expanduser(source))}) and, being a "
            "path, is not looked up on the hub; check --data"
        )


def looks_like_path(source: str) -> bool:
    """Is `source` meant as a local path rather than a hub id (`name` or `owner/name`)?

    Yes when it starts with `.`, `/` or `~`, holds a backslash, more than one `/` or a trailing `/`, or when its
    first component is an existing local folder (`data/derain` with `data/` here). `owner/name` otherwise goes to the hub.
    """
    if source.startswith((".", "/", "~")) or "\\" in source or source.count("/") > 1 or source.endswith("/"):
        return True
    return "/" in source and os.path.isdir(source.split("/", 1)[0])


def _load_from_disk(path: str, split: str):
    import datasets

    loaded = datasets.load_from_disk(path)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise AdapterkitError(f"{path} has no split '{split}'; available splits: {', '.join(loaded)}; pass --split")
        return loaded[split]
    return loaded


def _load_from_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise AdapterkitError(f"dataset {name} has no split '{split}' ({first_line(e)}); pass --split") from e
        raise AdapterkitError(f"cannot load dataset {name}: {first_line(e)}") from e
    except (OSError, ConnectionError, FileNotFoundError) as e:
        raise AdapterkitError(
            f"dataset '{name}' is not available offline (not a local folder, not in the datasets cache); download it "
            "once with network access, or save it with save_to_disk and pass that folder"
        ) from e


def _decode(value) -> Image.Image:
    """A PIL image, a path, or datasets' {"bytes", "path"} dict -> RGB image; Unreadable on any failure."""
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if value is None:
        raise Unreadable("empty image cell")
    if isinstance(value, str) and not os.path.isfile(value):
        raise Unreadable(f"missing file {value}")
    try:
        return read_rgb(value)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise Unreadable(f"{value if isinstance(value, str) else 'image bytes'}: {first_line(e)}") from e


def read_instructions_file(path: str) -> list[str]:
    """One instruction per line; blank lines and lines starting with # are ignored."""
    if not os.path.isfile(path):
        raise AdapterkitError(f"instructions file {path} does not exist")
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f]
    found = [line for line in lines if line and not line.startswith("#")]
    if not found:
        raise AdapterkitError(f"instructions file {path} holds no instruction (one per line)")
    return found
