"""Local dataset folders in datasets' imagefolder convention, read directly (no arrow cache): `metadata.jsonl` or
`metadata.csv` at the top (one split) or in `<split>/`; every key ending in `_file_name` is an image column named
without the suffix (`file_name` alone becomes `image`), paths relative to the metadata file and kept inside it."""

from __future__ import annotations

import csv
import json
import os

from ..errors import AdapterkitError

# A folder's description file; its "split" names the split a top-level metadata.jsonl holds. demo/tasks.py writes
# it (DATASET_INFO_FILE there; a test checks the two names agree).
SPLIT_INFO_FILE = "task.json"
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # datasets' imagefolder metadata formats, read without datasets


class Unreadable(Exception):
    """A row whose image cannot be read: skipped and counted (EditDataset.skipped)."""


class FolderTable:
    """metadata.jsonl or metadata.csv rows; image columns are paths relative to the metadata file."""

    def __init__(self, metadata: str, split: str):
        self.root = os.path.dirname(metadata)
        self.split, self.read_from = split, metadata
        self.records = []
        for number, record in _metadata_rows(metadata):
            for key, value in record.items():
                if (key == "file_name" or key.endswith("_file_name")) and isinstance(value, str) and value:
                    self._check_inside(metadata, number, key, value)
            self.records.append({_column_name(k): v for k, v in record.items()})
        self.columns = list(dict.fromkeys(k for r in self.records for k in r))
        self.num_rows = len(self.records)

    def _check_inside(self, metadata: str, number: int, key: str, value: str) -> None:
        """Image paths must stay inside the dataset folder: no absolute paths, no `../` escapes (issue 7)."""
        root = os.path.realpath(self.root)
        target = os.path.realpath(os.path.join(root, value))
        if os.path.isabs(value) or os.path.commonpath([root, target]) != root:
            raise AdapterkitError(
                f"{metadata} line {number}: {key} '{value}' points outside the dataset folder; use paths relative to it"
            )

    def strings(self, column: str) -> list[str]:
        return [str(r.get(column) or "") for r in self.records]

    def read(self, row: int, column: str):
        value = self.records[row].get(column)
        if not isinstance(value, str) or not value:
            raise Unreadable(f"no file name in column {column}")
        return os.path.join(self.root, value)  # checked to stay inside the folder when the table was read


def _metadata_rows(metadata: str):
    """(line number, record) of each row of a metadata.jsonl (one JSON object per line) or metadata.csv (a header
    line, then one row per line; datasets' imagefolder reads both)."""
    # utf-8-sig: spreadsheet programs start a saved CSV with a byte-order mark, which would rename the first column
    with open(metadata, encoding="utf-8-sig", newline="" if metadata.endswith(".csv") else None) as f:
        if metadata.endswith(".csv"):
            reader = csv.DictReader(f)
            if not reader.fieldnames or any(not name for name in reader.fieldnames):
                raise AdapterkitError(f"{metadata} has no header line naming every column (e.g. input_image_file_name,"
                                      "edited_image_file_name,edit_prompt); fix the file")
            for record in reader:
                if None in record or any(v is None for v in record.values()):
                    raise AdapterkitError(f"{metadata} line {reader.line_num} has {'more' if None in record else 'fewer'}"
                                          f" values than the header's {len(reader.fieldnames)} columns; fix the file")
                yield reader.line_num, record
            return
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AdapterkitError(f"{metadata} line {number} is not valid JSON ({e.msg}); fix the file") from e
            if not isinstance(record, dict):
                raise AdapterkitError(f"{metadata} line {number} is not a JSON object; fix the file")
            yield number, record


def _column_name(key: str) -> str:
    if key == "file_name":
        return "image"
    return key[: -len("_file_name")] if key.endswith("_file_name") else key


def metadata_file(folder: str) -> str | None:
    """`folder`'s metadata.jsonl or metadata.csv (METADATA_FILES), None when it has neither; both is refused, as
    datasets refuses metadata files of two formats in one folder."""
    found = [os.path.join(folder, name) for name in METADATA_FILES if os.path.isfile(os.path.join(folder, name))]
    if len(found) > 1:
        raise AdapterkitError(f"{folder} holds both {' and '.join(METADATA_FILES)}; keep the one that describes the pairs")
    return found[0] if found else None


def top_level_split(source: str, split: str, name: str = "metadata.jsonl") -> str:
    """The one split of a folder whose metadata file (`name`) is at its top: the `split` its task.json records (what
    `adapterkit demo-data --split` writes), else "train" (datasets' imagefolder rule). Asking for "train" (the
    default) reads it whatever its name; asking for another split than its own is refused, naming the rule."""
    own = "train"
    info = os.path.join(source, SPLIT_INFO_FILE)
    if os.path.isfile(info):
        try:
            with open(info, encoding="utf-8") as f:
                recorded = json.load(f).get("split")
        except (OSError, ValueError, AttributeError):
            recorded = None
        own = recorded if isinstance(recorded, str) and recorded else own
    if split in (own, "train"):
        return own
    where = f"its {SPLIT_INFO_FILE} names it '{own}'" if own != "train" else f"a top-level {name} is the train split"
    raise AdapterkitError(
        f"{source} holds one split, '{own}' ({name} at its top; {where}); pass --split {own}, or add "
        f"{split}/{name} for a '{split}' split"
    )
