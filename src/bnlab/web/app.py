"""The FastAPI app: the page, its assets, the results API (view 5) and the WebSocket (views 1-4).

Routes (nothing reads or writes a path taken from a request):

* ``GET /`` and ``GET /static/...``: the page and its assets, from the package;
* ``GET /api/runs``, ``GET /api/runs/{run_id}``: runs in the run store and one run's series;
* ``GET /claims/report``: the claims report as one self-contained HTML page.
* ``GET /api/claims``, ``GET /api/claims/{name}/plots/{index}``: the latest claim verdicts, and the
  ``index``-th plot of a claim's result, found through the result file, never through the URL;
* ``WS /ws``: one training session per connection (:mod:`bnlab.web.schema` is the protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from bnlab._json import dumps as strict_dumps, strict_json
from bnlab.web.jobs import JobManager, TooManyJobs
from bnlab.web.schema import ProtocolError, parse_message

__all__ = ["create_app", "TICK_SECONDS", "dumps"]

TICK_SECONDS = 0.05  # training data goes out at most 20 times a second
STATIC = Path(str(resources.files("bnlab.web") / "static"))
# Everything from this server; nothing inline, nothing from elsewhere.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
_RUN_ID = re.compile(r"^[0-9a-f]{4,32}$")
_CLAIM = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


def dumps(message: dict) -> str:
    """Compact JSON with NaN and infinities as null (a diverged loss must not break the page's parser)."""
    return strict_dumps(message, separators=(",", ":"))


def create_app(manager: JobManager | None = None, *, store_path: Path | None = None) -> FastAPI:
    """The app; ``manager`` trains the sessions (a default one if None), ``store_path`` is the run store."""
    manager = manager or JobManager()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        manager.shutdown()

    app = FastAPI(title="bnlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.manager = manager

    @app.middleware("http")
    async def security_headers(request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/runs")
    async def runs():
        return await asyncio.to_thread(_runs, store_path)

    @app.get("/api/runs/{run_id}")
    async def run(run_id: str):
        if not _RUN_ID.match(run_id):
            raise HTTPException(404, "no such run")
        return await asyncio.to_thread(_run_series, store_path, run_id)

    @app.get("/api/claims")
    async def claims():
        return await asyncio.to_thread(_claims, store_path)

    @app.get("/api/claims/{name}/plots/{index}")
    async def claim_plot(name: str, index: int):
        if not _CLAIM.match(name):
            raise HTTPException(404, "no such claim")
        path = await asyncio.to_thread(_claim_plot, store_path, name, index)
        return FileResponse(path, media_type="image/png")

    @app.get("/claims/report")
    async def claims_report():
        return HTMLResponse(await asyncio.to_thread(_claims_report, store_path))

    @app.websocket("/ws")
    async def session(socket: WebSocket):
        await socket.accept()
        await _session(socket, manager)

    return app


async def _session(socket: WebSocket, manager: JobManager) -> None:
    """One browser tab: its job lives exactly as long as the socket."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def notify():  # called by the worker thread; the loop may be gone if the server is stopping
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(wake.set)

    try:
        job = manager.open(notify=notify)
    except TooManyJobs as exc:
        await socket.send_text(dumps({"type": "error", "where": "server", "message": str(exc)}))
        await socket.close(code=1013)
        return
    job.emit({"type": "ready", "settings": job.settings, "state": job.state, "job": job.id,
              "tick_seconds": TICK_SECONDS})
    sender = asyncio.create_task(_send_loop(socket, job, wake))
    try:
        while True:
            frame = await socket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            text = frame.get("text") if frame.get("text") is not None else frame.get("bytes") or b""
            try:
                message = parse_message(text)
                if message["type"] == "ping":  # answered by the event loop itself: its responsiveness
                    job.emit({"type": "pong", "id": message["id"], "server_time": time.time()})
                else:
                    job.submit(message)
            except ProtocolError as exc:
                job.emit({"type": "error", "where": "message", "message": str(exc)})
    except WebSocketDisconnect:
        pass
    finally:
        manager.close(job)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender


async def _send_loop(socket: WebSocket, job, wake: asyncio.Event) -> None:
    """Replies go out as soon as they exist; training data at most every ``TICK_SECONDS``."""
    last_tick = 0.0
    while True:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), timeout=TICK_SECONDS)
        wake.clear()
        for message in job.take_outbox():
            await socket.send_text(dumps(message))
        now = time.monotonic()
        if now - last_tick >= TICK_SECONDS:
            tick = job.take_tick()
            if tick is not None:
                await socket.send_text(dumps(tick))
                last_tick = now


# -- view 5: the run store and the claims, read only -------------------------------------------------


def _open_store(store_path: Path | None):
    from bnlab.store import RunStore, default_store_path

    path = Path(store_path) if store_path is not None else default_store_path()
    # read-only: never create a store just to show it is empty, never write to the user's results
    return RunStore(path, readonly=True) if path.exists() else None


def _runs(store_path: Path | None) -> JSONResponse:
    store = _open_store(store_path)
    if store is None:
        return JSONResponse({"runs": []})
    with store:
        rows = []
        for r in store.runs()[-500:]:
            model, train = r.config.get("model", {}), r.config.get("train", {})
            rows.append({"id": r.id, "label": r.label, "seed": r.seed, "status": r.effective_status,
                         "steps": r.steps_done, "total_steps": r.total_steps, "created": r.created,
                         "norm": model.get("norm"), "dataset": train.get("dataset"),
                         "final_test_acc": (r.summary or {}).get("final_test_acc")})
    return JSONResponse(strict_json({"runs": rows}))


def _run_series(store_path: Path | None, run_id: str) -> JSONResponse:
    from bnlab.store import StoreError

    store = _open_store(store_path)
    if store is None:
        raise HTTPException(404, "no run store")
    with store:
        try:
            r = store.run(run_id)
        except (StoreError, KeyError, LookupError) as exc:
            raise HTTPException(404, "no such run") from exc
        series = {k: v for k, v in store.metrics(r.id).items() if k in ("test_acc", "train_loss", "test_loss")}
        body = {"id": r.id, "label": r.label, "seed": r.seed, "status": r.effective_status, "config": r.config,
                "series": {k: {"steps": [s for s, _ in v], "values": [x for _, x in v]} for k, v in series.items()}}
    return JSONResponse(strict_json(body))


def _claims_directory(store_path: Path | None) -> Path:
    from bnlab.store import default_store_path

    return (Path(store_path) if store_path is not None else default_store_path()).parent / "claims"


def _claims_results(store_path: Path | None):
    from bnlab.report.claims_report import load_results

    directory = _claims_directory(store_path)
    return load_results(directory) if directory.is_dir() else {}


def _claims(store_path: Path | None) -> JSONResponse:
    from bnlab.experiments.claims import CLAIMS

    results = _claims_results(store_path)
    rows = []
    for claim in sorted(CLAIMS.values(), key=lambda c: c.number):
        r = results.get(claim.name)
        rows.append({"name": claim.name, "number": claim.number, "title": claim.title, "rule": claim.rule,
                     "seed_wording": claim.seed_wording, "anchor": claim.anchor,
                     "verdict": r.verdict if r else None, "reason": r.reason if r else None,
                     "protocol": r.protocol if r else None, "seeds": r.seeds if r else None,
                     "statistic": r.statistic if r else None,
                     "plots": len(_plots(r, _claims_directory(store_path), draw=False))})
    return JSONResponse(strict_json({"claims": rows}))


def _plots(result, directory: Path, draw: bool = True) -> list[Path]:
    """The PNG plots of a claim result: image files that results made before figures were data list
    (relative paths are from where it was run), then its figures, drawn once into ``directory/figures``
    (again when the result is newer than the drawing). ``draw=False`` only names them."""
    from bnlab.report.plots import draw as draw_figure

    if result is None:
        return []
    files = [Path(p) for p in result.plots if p.endswith(".png") and Path(p).is_file()]
    cache = directory / "figures"
    stored = directory / f"{result.claim}.{result.protocol}.json"
    for spec in result.figures:
        path = cache / spec["file"]
        if draw and (not path.is_file() or (stored.is_file() and stored.stat().st_mtime > path.stat().st_mtime)):
            draw_figure(spec, cache)
        files.append(path)
    return files


_REPORT_LOCK = threading.Lock()  # one request at a time writes the figures and the page


def _claims_report(store_path: Path | None) -> str:
    """The claims report as one self-contained page (``bnlab claims report`` writes the same page)."""
    from bnlab.report.claims_report import write_claims_report

    with _REPORT_LOCK:
        paths = write_claims_report(_claims_results(store_path), _claims_directory(store_path) / "figures")
        return paths["html"].read_text()


def _claim_plot(store_path: Path | None, name: str, index: int) -> Path:
    plots = _plots(_claims_results(store_path).get(name), _claims_directory(store_path))
    if not 0 <= index < len(plots):
        raise HTTPException(404, "no such plot")
    return plots[index]
