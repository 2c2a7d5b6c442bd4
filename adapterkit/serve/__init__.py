"""`adapterkit serve`: one base and many adapters behind an HTTP API and a web page, with request batching.

- `settings.py`: the typed, frozen `ServeSettings` (limits, batching, timeouts).
- `scheduler.py`: one worker thread forms batches of compatible requests and runs them through the bank.
- `catalog.py`: the adapters being served; adds and removes them at run time, only from the server's --adapter-dir.
- `inputs.py`: reads and checks an edit request (multipart or JSON), one-line errors with their HTTP status.
- `metrics.py`: Prometheus counters, histograms and gauges of one server.
- `app.py`: the FastAPI routes; `page/`: the web page (plain HTML and JS, no build step).
- `run.py`: `serve()`, load the base and adapters, start uvicorn.

FastAPI, uvicorn, python-multipart and prometheus-client come with the `[serve]` extra. Nothing here is imported by
`import adapterkit`; the CLI imports `run` inside its command.
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_LAZY = {"serve": ".run", "create_app": ".app", "ServeSettings": ".settings"}

__getattr__ = lazy_getattr(__name__, _LAZY, globals())
__all__ = sorted(_LAZY)
