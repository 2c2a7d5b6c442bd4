"""Eval rows: each task's dataset rows, resized, with the instruction and seed every column uses (rules in run.py)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from ..data import TASK_KEYWORDS, EditDataset, load_edit_dataset, task_matches
from ..errors import AdapterkitError
from ..inference import resize_for_edit, to_rgb
from .columns import Column


@dataclass
class TaskRow:
    """One dataset row as every column sees it: the same resized input, instruction and seed."""

    row: int  # index within the task's rows: the file name under images/<task>/<column>/
    source_row: int  # row number in the dataset (split) it came from
    input: Image.Image
    target: Image.Image
    instruction: str
    seed: int


# -------------------------------------------------------------------------------------------------------- rows
def load_rows(
    data,
    tasks: list[str],
    columns: list[Column],
    data_options: dict,
    task_rows: str,
    limit: int | None,
    instructions: str,
    resolution: int,
    seed: int,
) -> tuple[dict[str, list[TaskRow]], dict[str, str]]:
    """task -> its rows, resized, with the instruction and seed every column will use (rules: module doc).

    Also returns {task: reason} for tasks left out: a task only a merge contains and the data lacks. A plain
    adapter's task without rows is an error. Unreadable rows are skipped (they do not count towards `limit`).
    `data` is a source for `load_edit_dataset` or an EditDataset already opened (`open_rows`).
    """
    dataset = data if isinstance(data, EditDataset) else open_rows(data, data_options, instructions)
    data = dataset.source
    selection = select_task_rows(dataset.instructions, tasks, task_rows)
    judged_alone = {c.adapter.task for c in columns if c.kind == "adapter"}
    out, left_out = {}, {}
    for task in tasks:
        if not selection[task]:
            if task in judged_alone:
                raise AdapterkitError(
                    f"no row of {data} belongs to task '{task}' (instructions are matched by the task's keywords or "
                    "name); check --data and --split, or pass --task-rows all to judge every adapter on every row"
                )
            left_out[task] = f"skipped: no row of the data belongs to task '{task}'"
            continue
        pool = _task_instructions(task, columns)
        picked = []
        for i in selection[task]:
            example = dataset.get(i)  # None for a row whose image files are unreadable
            if example is not None:
                picked.append(_task_row(example, len(picked), dataset.rows[i], pool, instructions, resolution, seed, task))
            if limit is not None and len(picked) == limit:
                break
        if not picked:
            raise AdapterkitError(f"no row of task '{task}' in {data} has readable images; check the image files")
        out[task] = picked
    return out, left_out


def open_rows(data: str, data_options: dict, instructions: str) -> EditDataset:
    """The eval's dataset: instructions are required only when the rows' own are used."""
    return load_edit_dataset(data, require_instruction=instructions == "data", **data_options)


def select_task_rows(texts: list[str], tasks: list[str], task_rows: str) -> dict[str, list[int]]:
    """task -> dataset indices it is judged on.

    "all": every index for every task. "match": the indices whose instruction belongs to the task
    (`data.task_matches`: known tasks by keywords, others by their name). "auto": "all" when the eval has
    one task and the data is single-task (its instructions match at most one task, known or evaluated), else
    "match".
    """
    every = list(range(len(texts)))
    if task_rows == "all":
        return {task: every for task in tasks}
    if task_rows == "auto" and len(tasks) == 1:
        candidates = list(dict.fromkeys([*tasks, *TASK_KEYWORDS]))
        present = [t for t in candidates if any(task_matches(text, t) for text in texts)]
        if len(present) <= 1:
            return {tasks[0]: every}
    return {task: [i for i in every if task_matches(texts[i], task)] for task in tasks}


def _task_instructions(task: str, columns: list[Column]) -> list[str]:
    """The task's stored instructions: from its adapter, else from a merge's record of that source."""
    for column in columns:
        if column.kind == "adapter" and column.adapter.task == task and column.adapter.instructions:
            return list(column.adapter.instructions)
    for column in columns:
        if column.kind == "merge" and (recorded := column.adapter.merge.source_instructions(task)):
            return recorded
    return []


def _task_row(example, row: int, source_row: int, pool: list[str], source: str, resolution: int, seed: int, task: str) -> TaskRow:
    instruction = (example.instruction or "").strip()
    if source == "adapter" or not instruction:
        if not pool:
            raise AdapterkitError(
                f"row {row} of task '{task}' needs an instruction but neither the data nor a '{task}' adapter has one; "
                "pass --instruction-column or an adapter with stored instructions"
            )
        instruction = pool[row % len(pool)]
    image = resize_for_edit(to_rgb(example.input), resolution)
    target = to_rgb(example.target)
    if target.size != image.size:
        target = target.resize(image.size, Image.BICUBIC)
    return TaskRow(row=row, source_row=source_row, input=image, target=target, instruction=instruction, seed=seed + row)
