"""`serve()`: load the base and the adapters once, then run the app under uvicorn until interrupted."""

from __future__ import annotations

import logging

from ..base import load_base
from ..devices import AUTO as AUTO_DEVICE
from ..devices import DEFAULT_DTYPE, describe, record
from ..errors import AdapterkitError
from .settings import ServeSettings

log = logging.getLogger("adapterkit.serve")


def build_catalog(base: str, adapters=(), adapter_dir: str | None = None, device: str = AUTO_DEVICE,
                  force: bool = False, compile: bool = False, dtype: str = DEFAULT_DTYPE):
    """The base loaded once (`device` / `dtype`: devices.py) with every --adapter and every adapter folder of
    --adapter-dir in its bank."""
    import os

    from ..devices import placement
    from .catalog import Catalog

    if adapter_dir and not os.path.isdir(adapter_dir):
        raise AdapterkitError(f"--adapter-dir {adapter_dir} is not a folder; create it or pass an existing one")
    device, dtype = placement(device, dtype)  # a bad --device fails before the slow load
    catalog = Catalog(load_base(base, dtype=dtype, device=device), adapter_dir=adapter_dir, force=force)
    for folder in adapters:
        catalog.add_folder(folder)
    for problem in catalog.load_dir():
        log.warning("skipped --adapter-dir folder %s", problem)
    if compile:
        import torch

        catalog.bank.prepare()  # sizes the live LoRA slot before compiling, so swaps do not recompile
        catalog.bank.pipe.unet = torch.compile(catalog.bank.pipe.unet)
        catalog.compiled = True
    return catalog


def check_port(host: str, port: int) -> None:
    """Fail before the slow base load when host:port cannot be listened on (in use, or not this machine's address)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
        try:
            s.bind((host, port))
        except OSError as e:
            raise AdapterkitError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or --host, "
                                  "or stop the server already there") from None


def serve(base: str, adapters=(), adapter_dir: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          settings: ServeSettings | None = None, device: str = AUTO_DEVICE, force: bool = False, compile: bool = False,
          samples: dict[str, bytes] | None = None, log_level: str = "info", dtype: str = DEFAULT_DTYPE) -> None:
    """Serve `base` with its adapters on host:port (127.0.0.1 by default: only this machine can connect)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise AdapterkitError(f"adapterkit serve needs the [serve] extra ({e.name} is missing): pip install 'adapterkit[serve]'") from None
    check_port(host, port)
    catalog = build_catalog(base, adapters, adapter_dir, device=device, force=force, compile=compile, dtype=dtype)
    app = create_app(catalog, settings or ServeSettings(), samples=samples)
    log.warning("serving %s with adapters %s on http://%s:%d (%s)", base, ", ".join(catalog.tasks) or "none", host, port,
                describe(**record(catalog.bank.pipe)))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
