"""bench/tiny_tasks.py's retention follows `adapterkit eval`'s rule: a ratio only where the task adapter's per-row
gain over the base is above the rows' noise (its 95% interval above zero), otherwise None and the reason."""

from __future__ import annotations

import pytest


def test_retention_is_the_ratio_of_mean_gains_when_the_adapter_gain_is_clear(tiny_tasks_bench):
    base = [10.0, 11.0, 12.0, 13.0]
    adapter = [14.0, 14.8, 16.1, 17.0]  # gain 3.975 dB, every row positive
    merged = [12.0, 13.0, 14.0, 15.0]  # gain 2.0
    assert tiny_tasks_bench._retention_note(adapter, base) is None
    assert tiny_tasks_bench._retention(merged, adapter, base) == pytest.approx(2.0 / 3.975)
    low, high = tiny_tasks_bench._retention_interval(merged, adapter, base)
    assert low <= 2.0 / 3.975 <= high


def test_retention_is_not_applicable_when_the_adapter_gain_is_within_the_rows_noise(tiny_tasks_bench):
    base = [10.0, 11.0, 12.0, 13.0]
    adapter = [11.5, 10.0, 13.4, 12.5]  # mean gain +0.35 dB, rows -1.0..+1.5: the interval spans zero
    merged = [12.0, 13.0, 14.0, 15.0]
    note = tiny_tasks_bench._retention_note(adapter, base)
    assert note is not None and "not above the rows' noise" in note
    assert tiny_tasks_bench._retention(merged, adapter, base) is None
    assert tiny_tasks_bench._retention_interval(merged, adapter, base) is None
