"""The FastAPI app: routes, error answers (one-line JSON, the server keeps serving) and the request guard.

POST /v1/edit         multipart (file field `image`) or JSON (base64 `image`): instruction, adapter ("auto", "base"
                      or a name), seed, steps, guidance, image_guidance, resolution, timeout. Answers the edited PNG,
                      with the routing decision and timings in X-Adapterkit-* headers; with `Accept:
                      application/json`, the same as JSON with the PNG in base64.
POST /v1/route        {"instruction"}: the adapter an "auto" edit would use, and the cosine
GET  /v1/adapters     loaded adapters; POST / DELETE /v1/adapters/{name}: load from / drop (--adapter-dir only)
GET  /healthz, GET /metrics (Prometheus text), GET / (the web page), GET /v1/samples[/{name}]
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..adapters.bank import AUTO
from ..errors import AdapterkitError, first_line
from ..inference import at_input_size, fit_for_edit, largest_default_side
from .inputs import BASE, ServeError, decode_image, parse_params, read_fields, unknown_adapter
from .metrics import Metrics
from .page import PAGE_FILES, page_path
from .scheduler import Job, QueueFull, Scheduler
from .settings import ServeSettings

POLL_S = 0.05  # how often a waiting request checks whether its client is still there


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: bodies over the limit get 413 (from Content-Length, or while being read), and every
    request is counted in the metrics by route and status."""

    def __init__(self, app, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.monotonic(), {"code": 500}
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.limit:
            await error(413, self._message(int(length)))(scope, receive, send)
            return self.metrics.observe_request("other", 413, time.monotonic() - started)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ServeError(413, self._message(seen, at_least=True))
            return message

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, recording_send)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "other"), status["code"], time.monotonic() - started)

    def _message(self, size: int, at_least: bool = False) -> str:
        return (f"request body is {'over ' if at_least else ''}{size} bytes, over this server's limit of {self.limit} "
                "(--max-body-mb); send a smaller image")


def create_app(catalog, settings: ServeSettings | None = None, samples: dict[str, bytes] | None = None) -> FastAPI:
    """The app for one Catalog. Its worker thread starts and stops with the app (lifespan)."""
    settings = settings or ServeSettings()
    metrics = Metrics()
    scheduler = Scheduler(catalog, settings, metrics)
    metrics.adapters.set(len(catalog.tasks))

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="adapterkit", summary="InstructPix2Pix edits with hot-swapped task adapters", lifespan=lifespan)
    app.state.catalog, app.state.scheduler, app.state.metrics, app.state.settings = catalog, scheduler, metrics, settings
    app.state.samples = dict(samples or {})
    # No resolution asked: a shorter side over 4x the base's training size, or over the largest resolution a request
    # may ask for, is scaled down to it and answered at the size sent; a phone photo edited at its own size held the
    # one worker for hours on a CPU, past every request's timeout.
    app.state.largest_default_side = min(largest_default_side(catalog.bank.base.resolution), settings.max_resolution)
    app.add_middleware(Guard, limit=settings.max_body_bytes, metrics=metrics)
    _add_error_handlers(app)
    _add_edit_route(app)
    _add_admin_routes(app)
    _add_page_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def serve_error(request, e: ServeError):
        return error(e.status, str(e), e.headers)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return error(503, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(AdapterkitError)
    async def bad_input(request, e: AdapterkitError):
        return error(400, first_line(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error(e.status_code, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):
        return error(500, f"unexpected error: {type(e).__name__}: {first_line(e)}")


EDIT_BODY = {  # the request bodies /v1/edit reads by hand, for the OpenAPI page
    "required": True,
    "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image", "instruction"], "properties": {
            "image": {"type": "string", "format": "binary"}, "instruction": {"type": "string"},
            "adapter": {"type": "string", "default": "auto"}, "seed": {"type": "integer", "default": 0},
            "steps": {"type": "integer"}, "guidance": {"type": "number"}, "image_guidance": {"type": "number"},
            "resolution": {"type": "integer"}, "timeout": {"type": "number"}}}},
        "application/json": {"schema": {"type": "object", "required": ["image", "instruction"], "properties": {
            "image": {"type": "string", "description": "base64 of the image file (a data: URL works too)"},
            "instruction": {"type": "string"}, "adapter": {"type": "string", "default": "auto"}}}},
    },
}


def _resolve_adapter(name: str, catalog) -> str | None:
    if name == AUTO:
        return AUTO
    if name == BASE:
        return None
    if name not in catalog.bank:
        raise unknown_adapter(name, catalog.tasks)
    return name


async def _wait(request: Request, job: Job, deadline: float, timeout: float):
    """The job's Outcome; None when the client went away (the job is dropped if not started); 504 past the deadline."""
    future = asyncio.wrap_future(job.future)
    future.add_done_callback(lambda f: f.cancelled() or f.exception())  # an abandoned job's error is not logged
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or future.cancelled():
            job.drop("timeout")
            raise ServeError(504, f"the edit did not finish within {timeout:g} s (queue and compute); retry later, "
                                  "with fewer steps, or with a longer timeout")
        done, _ = await asyncio.wait({future}, timeout=min(POLL_S, remaining))
        if done and not future.cancelled():
            return future.result()
        if await request.is_disconnected():
            job.drop("disconnected")
            return None


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _add_edit_route(app: FastAPI) -> None:
    state = app.state

    @app.post("/v1/edit", openapi_extra={"requestBody": EDIT_BODY}, response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the edited image"}})
    async def edit(request: Request):
        """Edit one image; batched with other requests that share its size and options."""
        arrived = time.monotonic()
        raw, data = await read_fields(request)
        params = parse_params(raw, state.settings)
        task = _resolve_adapter(params.adapter, state.catalog)
        image = await run_in_threadpool(decode_image, data, state.settings, params.resolution)
        # a phone photo is scaled down (and the answer back up) in the threadpool: 12 MP take ~0.2 s to resize
        work = await run_in_threadpool(fit_for_edit, image, params.resolution, state.largest_default_side)
        timeout = params.timeout or state.settings.timeout_s
        job = state.scheduler.submit(Job(work, params.instruction, task, params.seed, params.options(state.catalog.bank.base), arrived + timeout))
        outcome = await _wait(request, job, arrived + timeout, timeout)
        if outcome is None:
            return Response(status_code=499)  # nobody is listening; nginx's code for "client closed request"
        png = await run_in_threadpool(lambda: _png(at_input_size(outcome.image, image, None)))  # the size it came in
        info = {"adapter": outcome.task or BASE, "routed": task == AUTO, "score": outcome.score, "seed": params.seed,
                "edited_size": f"{work.width}x{work.height}",
                "batch_size": outcome.batch_size, "queue_ms": round(outcome.queue_s * 1000, 1),
                "compute_ms": round(outcome.compute_s * 1000, 1), "total_ms": round((time.monotonic() - arrived) * 1000, 1)}
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse({**info, "image": base64.b64encode(png).decode("ascii")})
        headers = {f"X-Adapterkit-{k.replace('_', '-').title()}": json.dumps(v) if not isinstance(v, str) else v
                   for k, v in info.items()}
        return Response(png, media_type="image/png", headers=headers)

    @app.post("/v1/route")
    async def route(request: Request):
        """The adapter an "auto" edit of this instruction would use: {"adapter", "score"} ("base" below threshold)."""
        try:
            instruction = (await request.json()).get("instruction")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            instruction = None
        if not isinstance(instruction, str) or not instruction.strip():
            raise ServeError(400, 'send JSON {"instruction": "derain the image"}')
        task, score = await run_in_threadpool(state.catalog.bank.route, instruction)
        return {"adapter": task or BASE, "score": score, "threshold": state.catalog.bank.route_threshold}


def _add_admin_routes(app: FastAPI) -> None:
    state = app.state

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "adapters": len(state.catalog.tasks), "queue_depth": state.scheduler.depth}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/adapters")
    async def adapters():
        """Loaded adapters, and the folders of --adapter-dir that POST /v1/adapters/{name} can load."""
        loaded = {row["folder"] for row in state.catalog.describe()}
        return {"adapters": state.catalog.describe(), "special": [AUTO, BASE],
                "adapter_dir": [n for n in state.catalog.folders_in_dir() if n not in loaded]}

    def changed(fn, *args):
        with state.scheduler.exclusive():
            result = fn(*args)
            state.metrics.adapters.set(len(state.catalog.tasks))
            return result

    @app.post("/v1/adapters/{name}", status_code=201)
    async def add_adapter(name: str):
        """Load the adapter folder `name` from the server's --adapter-dir (never from uploaded files)."""
        return {"added": await run_in_threadpool(changed, state.catalog.add_from_dir, name)}

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        await run_in_threadpool(changed, state.catalog.remove, name)
        return {"removed": name}


def _add_page_routes(app: FastAPI) -> None:
    state = app.state

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(page_path("index.html"), media_type="text/html")

    @app.get("/page/{name}", include_in_schema=False)
    async def page_file(name: str):
        if name not in PAGE_FILES:
            raise ServeError(404, f"no page file '{name}'")
        return FileResponse(page_path(name), media_type=PAGE_FILES[name])

    @app.get("/v1/samples")
    async def samples():
        """Names of the bundled sample images."""
        return {"samples": sorted(state.samples)}

    @app.get("/v1/samples/{name}", response_class=Response)
    async def sample(name: str):
        if name not in state.samples:
            raise ServeError(404, f"no sample '{name}'; samples: {', '.join(sorted(state.samples)) or 'none'}")
        return Response(state.samples[name], media_type="image/png")
