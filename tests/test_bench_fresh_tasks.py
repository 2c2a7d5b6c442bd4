"""bench/fresh_tasks.py: its four tasks are well-formed datasets that `adapterkit train` reads (the bench itself
trains and scores them; README has its figures)."""

from __future__ import annotations

import numpy as np

from adapterkit.data import load_edit_dataset


def test_rows_are_deterministic_and_edit_the_picture(fresh_tasks_bench):
    for task, (_make, _method, stored, never) in fresh_tasks_bench.FRESH.items():
        rows = fresh_tasks_bench.make_rows(task, 6, "eval", 64)
        again = fresh_tasks_bench.make_rows(task, 6, "eval", 64)
        for r, s in zip(rows, again):
            assert r.input.dtype == np.uint8 and r.input.shape == (64, 64, 3) == r.target.shape
            assert np.array_equal(r.input, s.input) and np.array_equal(r.target, s.target)
            assert np.abs(r.input.astype(int) - r.target.astype(int)).mean() > 2, task  # the edit is visible
            assert r.instruction in stored
        unseen = fresh_tasks_bench.make_rows(task, 6, "eval", 64, unseen=True)
        assert {r.instruction for r in unseen} <= set(never) and not set(never) & set(stored)
        assert np.array_equal(unseen[0].input, rows[0].input)  # same pictures, other phrasings


def test_desnow_mask_marks_the_flakes(fresh_tasks_bench):
    for row in fresh_tasks_bench.make_rows("desnow", 4, "eval", 64):
        assert 0.005 < row.mask.mean() < 0.5
        brighter = row.input.astype(int).sum(-1) - row.target.astype(int).sum(-1)
        assert brighter[row.mask].mean() > 5 * max(1.0, brighter[~row.mask].mean())  # flakes brighten their pixels


def test_dataset_folder_is_read_by_train(fresh_tasks_bench, tmp_path):
    folder = fresh_tasks_bench.write_dataset("dehaze", str(tmp_path / "dehaze"), 12, 64)
    data = load_edit_dataset(folder)
    assert len(data) == 12
    assert set(data.instructions) <= set(fresh_tasks_bench.FRESH["dehaze"][2]) and len(set(data.instructions)) > 1
