"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not share counters).

adapterkit_requests_total{endpoint,status}  every answered request
adapterkit_request_seconds{endpoint}        latency histogram, arrival to response
adapterkit_queue_seconds                    time an edit waited before its batch started
adapterkit_batch_size                       requests per pipeline call (histogram)
adapterkit_batch_seconds                    duration of each pipeline call
adapterkit_queue_depth                      requests waiting now (gauge)
adapterkit_images_total{adapter}            images edited, by adapter ("base" for the base alone)
adapterkit_swaps_total                      batches whose adapters differ from the previous batch's (what a
                                            one-adapter-at-a-time server would swap)
adapterkit_dropped_total{reason}            edits dropped before any work: disconnected, timeout, shutdown
adapterkit_stopped_total{reason}            edits stopped between denoising steps: every request of their batch
                                            was abandoned (disconnected, timeout)
adapterkit_adapters                         adapters loaded now (gauge)
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, float("inf"))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, float("inf"))


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("adapterkit_requests", "Answered requests", ["endpoint", "status"], registry=r)
        self.latency = Histogram("adapterkit_request_seconds", "Request latency, arrival to response", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("adapterkit_queue_seconds", "Wait before an edit's batch started", buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("adapterkit_batch_size", "Requests per pipeline call", buckets=BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("adapterkit_batch_seconds", "Duration of each pipeline call", buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("adapterkit_queue_depth", "Requests waiting for a batch", registry=r)
        self.images = Counter("adapterkit_images", "Images edited", ["adapter"], registry=r)
        self.swaps = Counter("adapterkit_swaps", "Batches whose set of adapters differs from the previous batch's", registry=r)
        self.dropped = Counter("adapterkit_dropped", "Edits dropped before any work was done", ["reason"], registry=r)
        self.stopped = Counter("adapterkit_stopped", "Edits stopped mid-batch: every request of the batch abandoned",
                               ["reason"], registry=r)
        self.adapters = Gauge("adapterkit_adapters", "Adapters loaded", registry=r)
        self._last_used: set | None = None  # adapters of the previous batch

    def observe_batch(self, jobs, started: float, seconds: float) -> None:
        """One pipeline call of `jobs` (tasks resolved), started at time.monotonic() `started`."""
        self.batch_size.observe(len(jobs))
        self.batch_seconds.observe(seconds)
        for job in jobs:
            self.images.labels(adapter=job.task or "base").inc()
            self.queue_wait.observe(max(0.0, started - job.submitted))
        used = {job.task for job in jobs}
        if used != self._last_used:
            self.swaps.inc()
            self._last_used = used

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
