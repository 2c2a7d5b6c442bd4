"""The serve scheduler's batching rule, drops and refusals, in-process on a recording bank (no model, no HTTP)."""

from __future__ import annotations

import time

import pytest
from PIL import Image

pytest.importorskip("prometheus_client", reason="the [serve] extra is not installed: pip install -e '.[serve]'")

from adapterkit.errors import AdapterkitError  # noqa: E402
from adapterkit.serve.metrics import Metrics  # noqa: E402
from adapterkit.serve.scheduler import Job, QueueFull, Scheduler  # noqa: E402
from adapterkit.serve.settings import ServeSettings  # noqa: E402


class RecordingBank:
    """Answers edit_batch with the input images and records each call: (tasks, seeds, sizes, options)."""

    tasks = ["a", "b"]

    def __init__(self):
        self.calls = []

    def __contains__(self, task):
        return task in self.tasks

    def route(self, instruction):
        return ("a", 0.97) if "a" in instruction.split() else (None, 0.2)

    def edit_batch(self, images, instructions, tasks=None, seeds=None, **options):
        if "bad" in instructions:
            raise AdapterkitError("a bad instruction")
        assert callable(options.pop("stop"))  # the scheduler's check for a batch nobody waits for any more
        self.calls.append((list(tasks), list(seeds), [i.size for i in images], options))
        return list(images)


class Holder:
    def __init__(self, bank):
        self.bank = bank


def job(seed, size=(64, 64), task="a", instruction="x", steps=2, deadline_s=60.0):
    return Job(Image.new("RGB", size), instruction, task, seed, {"steps": steps}, time.monotonic() + deadline_s)


def scheduler(bank, **settings):
    return Scheduler(Holder(bank), ServeSettings(**{"batch_wait_ms": 0, **settings}), Metrics())


def test_batches_hold_at_most_max_batch_requests_of_one_size_and_options_oldest_first():
    bank = RecordingBank()
    s = scheduler(bank, max_batch=4, queue=16)
    jobs = [job(1), job(10, size=(64, 48)), job(2, task="b"), job(3, task=None), job(11, size=(64, 48)), job(4),
            job(5), job(20, steps=3)]
    for j in jobs:
        s.submit(j)
    s.start()
    outcomes = [j.future.result(timeout=30) for j in jobs]
    s.stop()
    assert [c[1] for c in bank.calls] == [[1, 2, 3, 4], [10, 11], [5], [20]]
    assert bank.calls[0][0] == ["a", "b", None, "a"] and bank.calls[1][2] == [(64, 48)] * 2 and bank.calls[3][3] == {"steps": 3}
    assert [o.batch_size for o in outcomes] == [4, 2, 4, 4, 2, 4, 1, 1]


def test_routing_happens_in_the_worker_and_is_reported():
    bank = RecordingBank()
    s = scheduler(bank)
    routed, alone = s.submit(job(0, task="auto", instruction="make a")), s.submit(job(1, task="auto", instruction="other"))
    s.start()
    assert (routed.future.result(30).task, routed.future.result(30).score) == ("a", 0.97)
    assert (alone.future.result(30).task, alone.future.result(30).score) == (None, 0.2)
    s.stop()
    assert bank.calls[0][0] == ["a", None]


def test_a_full_queue_is_refused_with_a_retry_after_and_dropped_jobs_do_no_work():
    bank = RecordingBank()
    s = scheduler(bank, queue=3)
    kept, cancelled, expired = s.submit(job(1)), s.submit(job(2)), s.submit(job(3, deadline_s=-1))
    with pytest.raises(QueueFull) as refused:
        s.submit(job(4))
    assert refused.value.retry_after >= 1 and "3 requests waiting" in str(refused.value)
    assert cancelled.drop("disconnected")
    s.start()
    assert kept.future.result(30).image is not None
    s.stop()
    assert bank.calls == [(["a"], [1], [(64, 64)], {"steps": 2})]  # no work for the other two
    assert expired.future.cancelled() and expired.drop_reason == "timeout"
    text = s.metrics.render().decode()
    assert 'adapterkit_dropped_total{reason="disconnected"} 1.0' in text and 'adapterkit_dropped_total{reason="timeout"} 1.0' in text


def test_one_bad_request_fails_alone_and_a_removed_adapter_is_a_404():
    bank = RecordingBank()
    s = scheduler(bank, max_batch=8)
    good, bad, gone = s.submit(job(1)), s.submit(job(2, instruction="bad")), s.submit(job(3, task="removed"))
    s.start()
    assert good.future.result(30).task == "a"
    with pytest.raises(AdapterkitError, match="bad instruction"):
        bad.future.result(30)
    with pytest.raises(Exception, match="unknown adapter 'removed'; known: auto, base, a, b") as e:
        gone.future.result(30)
    assert e.value.status == 404
    s.stop()
