"""The inspection service over HTTP (Starlette): the page ``web/page.html``, its JSON and PNG
endpoints, and the line's API ``POST /api/v1/predict`` described by ``GET /api/v1/openapi.json``.

    app = create_app(Service(predictor, limits), Access(token=None, hosts=["line3.local"]))

``Guard`` stands in front of every request: the ``Host`` header must name this server (loopback
names and the allowed hosts: a page of another site cannot reach it through DNS rebinding), a
cross-site ``Origin`` cannot post, the token is checked where there is one (``Authorization:
Bearer``, the ``token`` query parameter once, then a cookie), the body is counted against the
request limit, each browser gets an unguessable client cookie that scopes its jobs, and an
unexpected error answers 500 with one line and no traceback. Errors are ``{"error": message}``
with 400 (bad input), 401/403 (token, host), 404 (not yours or no such thing), 410 (expired),
413 (over a limit).
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import math
import secrets
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from utils.errors import InputError, UsageError
from utils.data.images import IMAGE_EXTENSIONS
from utils.inference.outputs import scores_csv
from utils.paths import ROOT
from utils.serving.service import (GROUPS, PICTURES, Gone, LimitError, NotFound, Service,
                           removed_on_error, safe_name)

__all__ = ["Access", "LOOPBACK", "create_app", "rle"]

log = logging.getLogger("vcp.web")
PAGE = ROOT / "web" / "page.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CLIENT_COOKIE, TOKEN_COOKIE = "vcp_client", "vcp_token"
STATUS = {LimitError: 413, NotFound: 404, Gone: 410}
# A refused request's body, up to this size and time, is read and dropped before the answer, so
# that a client still sending it reads the answer instead of a reset connection (as a server's
# lingering close does); a longer body is answered at once.
DRAIN_BYTES, DRAIN_SECONDS = 32 * 2**20, 10.0


@dataclass
class Access:
    """Who may talk to the server: the names it answers to in ``Host``, and its token (None:
    no token, only sensible on loopback)."""

    token: str | None = None
    hosts: list[str] = field(default_factory=list)

    def host_allowed(self, host: str) -> bool:
        name = host.rsplit("]", 1)[0].lstrip("[") if host.startswith("[") else \
            host.rsplit(":", 1)[0]
        return name.lower() in (*LOOPBACK, *(h.lower() for h in self.hosts))

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (given is not None
                                      and secrets.compare_digest(given, self.token))


async def _drain(receive, length: str) -> None:
    """Read and drop a request's body of at most ``DRAIN_BYTES`` (its Content-Length), for at most
    ``DRAIN_SECONDS``."""
    if length.isdigit() and int(length) > DRAIN_BYTES:
        return
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while (await receive()).get("more_body", False):
                pass
    except TimeoutError:
        pass


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class Guard:
    """ASGI middleware: host, origin and token checks, the request-size limit, the client
    cookie, and a 500 without internals for anything unexpected."""

    def __init__(self, app, access: Access, request_bytes: int):
        self.app, self.access, self.request_bytes = app, access, request_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refused = self._refused(request)
        if refused is not None:
            await _drain(receive, request.headers.get("content-length", ""))
            return await refused(scope, receive, send)
        client = request.cookies.get(CLIENT_COOKIE) or ""
        new_client = len(client) < 20
        client = secrets.token_urlsafe(16) if new_client else client
        scope.setdefault("state", {})["client"] = client
        cookies = [f"{CLIENT_COOKIE}={client}"] if new_client else []
        if self.access.token and request.query_params.get("token"):
            cookies.append(f"{TOKEN_COOKIE}={self.access.token}")
        started = False

        async def sending(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message.setdefault("headers", [])
                for c in cookies:
                    message["headers"].append(
                        (b"set-cookie", f"{c}; Path=/; HttpOnly; SameSite=Strict".encode()))
            await send(message)

        try:
            await self.app(scope, self._counted(receive), sending)
        except Exception as e:  # one line in the log, nothing internal in the answer
            log.error("internal error on %s %s: %s", scope["method"], scope["path"],
                      type(e).__name__)
            if not started:
                await _error("internal error; the server's log names it", 500)(
                    scope, receive, send)

    def _refused(self, request: Request) -> Response | None:
        """The answer to a request that may not go on, else None."""
        if not self.access.host_allowed(request.headers.get("host", "")):
            return _error("this server does not answer to that host name (Host header); "
                          "its operator can allow it", 403)
        origin = request.headers.get("origin")
        if origin and request.method not in ("GET", "HEAD") and \
                not self.access.host_allowed(origin.split("://", 1)[-1]):
            return _error("requests from another site are refused (Origin header)", 403)
        bearer = request.headers.get("authorization", "")
        given = (bearer[7:] if bearer.lower().startswith("bearer ") else None) or \
            request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
        if not self.access.token_ok(given):
            return _error("this server needs its token: open the address it printed at start "
                          "(...?token=...) or send Authorization: Bearer <token>", 401)
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.request_bytes:
            return _error(f"the request is too large: this server takes at most "
                          f"{self.request_bytes / 2**20:.0f} MiB per request", 413)
        return None

    def _counted(self, receive):
        """``receive`` that stops a body longer than the limit (a chunked one, say)."""
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.request_bytes:
                raise LimitError(f"the request is too large: this server takes at most "
                                 f"{self.request_bytes / 2**20:.0f} MiB per request")
            return message
        return counted


def answers(handler):
    """An endpoint whose input errors answer their status with the message."""
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except InputError as e:
            return _error(str(e), next((s for t, s in STATUS.items() if isinstance(e, t)), 400))
    return endpoint


def number(text: str | None, what: str, default: float | None = None) -> float:
    """A finite number from a form or query field."""
    if text in (None, "") and default is not None:
        return default
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise UsageError(f"{what}: expected a finite number, got {str(text)[:40]!r}")
    return value


def rle(mask: np.ndarray) -> dict:
    """A 0/255 mask [H, W] as run lengths, row by row, starting with a run of 0s."""
    flat = mask.ravel() > 0
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = ([0] if flat.size and flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


def _save(uploads: list[UploadFile], folder: Path) -> list[tuple[Path, str]]:
    """Each upload in ``folder`` under a name of ours (its extension kept), with its own name
    checked; in a worker thread."""
    names = [safe_name(u.filename) for u in uploads]
    folder.mkdir(parents=True, exist_ok=True)
    saved = []
    for k, (upload, name) in enumerate(zip(uploads, names)):
        suffix = Path(name).suffix.lower()
        path = folder / f"{k:05d}{suffix if suffix in IMAGE_EXTENSIONS else ''}"
        with open(path, "wb") as f:
            upload.file.seek(0)
            while chunk := upload.file.read(2**20):
                f.write(chunk)
        saved.append((path, name))
    return saved


class Endpoints:
    """The routes over one ``Service``."""

    def __init__(self, service: Service):
        self.service = service

    @staticmethod
    def client(request: Request) -> str:
        return request.scope["state"]["client"]

    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(), headers={"X-Frame-Options": "DENY"})

    async def describe(self, request: Request) -> JSONResponse:
        return JSONResponse(self.service.info)

    async def form(self, request: Request, files: int):
        """The request's form, at most ``files`` files."""
        self.service.reserve(self.client(request), int(request.headers.get("content-length", 0)))
        try:
            return await request.form(max_files=files, max_fields=100)
        except HTTPException as e:
            if "Too many files" in str(e.detail):
                raise LimitError(f"too many files in one request: this server takes at most "
                                 f"{files}") from None
            raise UsageError(str(e.detail)) from None

    async def create(self, request: Request) -> JSONResponse:
        """A new job from the page's form: files and/or a shared folder per input group."""
        form = await self.form(request, self.service.limits.files_per_job)
        kind = form.get("kind")
        if kind not in GROUPS:
            raise UsageError(f"kind: expected one of {sorted(GROUPS)}, got {str(kind)[:40]!r}")
        rate = 0.0
        if kind == "calibrate":
            rate = number(form.get("false_alarm_rate"), "false-alarm rate", 0.01)
            if not 0.0 <= rate < 1.0:
                raise UsageError(f"false-alarm rate: expected a number in [0, 1), got {rate}")
        folder = self.service.new_folder()
        job = await run_in_threadpool(self._job, form, kind, folder, rate, self.client(request))
        return JSONResponse({"job": job.id})

    def _job(self, form, kind: str, folder: Path, rate: float, client: str):
        """Save the uploads, list the shared folders and queue the job (a worker thread)."""
        with removed_on_error(folder):
            inputs = {}
            for group in GROUPS[kind]:
                uploads = [f for f in form.getlist(group) if isinstance(f, UploadFile)
                           and f.filename]
                inputs[group] = _save(uploads, folder / group)
                shared = str(form.get(f"{group}_folder") or "").strip()
                if shared:
                    inputs[group] += self.service.folders.images(shared)
            if not inputs[GROUPS[kind][0]]:
                first = GROUPS[kind][0]
                what = "images" if first == "images" else f"{first} images"
                raise UsageError(f"no {what} given: choose image files"
                                 + (" or name a shared folder" if self.service.folders.roots
                                    else ""))
        return self.service.submit(client, kind, inputs, folder, rate)

    async def status(self, request: Request) -> JSONResponse:
        q = request.query_params
        since = [int(q.get(k, "0")) if q.get(k, "0").isdigit() else 0
                 for k in ("since", "skipped_since")]
        return JSONResponse(self.service.status(self.client(request),
                                                request.path_params["job"], *since))

    async def cancel(self, request: Request) -> JSONResponse:
        what = self.service.cancel(self.client(request), request.path_params["job"])
        return JSONResponse({"job": request.path_params["job"], "state": what})

    async def picture(self, request: Request) -> Response:
        """image, overlay or mask PNG of one image of a job."""
        p, q = request.path_params, request.query_params
        if p["what"] not in PICTURES:
            raise NotFound(f"no {p['what'][:20]!r} picture: expected one of {', '.join(PICTURES)}")
        threshold = number(q.get("threshold"), "threshold") if p["what"] == "mask" else None
        side = int(q["side"]) if q.get("side", "").isdigit() and int(q["side"]) > 0 else None
        png = await run_in_threadpool(self.service.render, self.client(request), p["job"],
                                      p["index"], p["what"], threshold, side)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private"})

    async def map_data(self, request: Request) -> JSONResponse:
        p = request.path_params
        data = self.service.map_data(self.client(request), p["job"], p["index"])
        data["data"] = base64.b64encode(data["data"]).decode()
        return JSONResponse(data)

    async def scores(self, request: Request) -> Response:
        job = self.service.job(self.client(request), request.path_params["job"])
        return Response(scores_csv([i.row() for i in list(job.items)]), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="scores.csv"'})

    async def masks_zip(self, request: Request) -> Response:
        client, job_id = self.client(request), request.path_params["job"]
        threshold = number(request.query_params.get("threshold"), "threshold")
        items = list(self.service.job(client, job_id).items)
        if items:
            self.service.job(client, job_id).item(items[0].index)  # a calibration job: refused

        def pack() -> bytes:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                for i in items:
                    z.writestr(f"masks/{i.stem}.png",
                               self.service.render(client, job_id, i.index, "mask", threshold))
            return buf.getvalue()
        return Response(await run_in_threadpool(pack), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="masks.zip"'})

    async def predict(self, request: Request) -> JSONResponse:
        """The line's API: images in, one JSON object per image out, in input order."""
        limits = self.service.limits
        form = await self.form(request, limits.sync_images)
        threshold = number(form.get("threshold"), "threshold", self.service.info["threshold"])
        mask = str(form.get("mask") or "none")
        if mask not in ("none", "png", "rle"):
            raise UsageError(f"mask: expected none, png or rle, got {mask[:40]!r}")
        uploads = [f for f in form.getlist("images") if isinstance(f, UploadFile)]
        if not uploads:
            raise UsageError("no images given: send them as the form field 'images'")
        client, folder = self.client(request), self.service.new_folder()

        def queue():
            with removed_on_error(folder):
                inputs = {"images": _save(uploads, folder / "images")}
            return self.service.submit(client, "inspect", inputs, folder)
        job = await run_in_threadpool(queue)
        try:
            while not job.over.is_set():
                await asyncio.sleep(0.01)
            if job.error or job.state != "finished":
                raise UsageError(job.error or "the server stopped before this request was done")
            results = await run_in_threadpool(self._answers, job, threshold, mask, client)
        finally:
            self.service.delete(job)
        return JSONResponse({"threshold": threshold, "images": results})

    def _answers(self, job, threshold: float, mask: str, client: str) -> list[dict]:
        by_index = {i.index: i for i in job.items}
        skipped = {s["name"]: s["reason"] for s in job.skipped}
        out = []
        for index, (_, name) in enumerate(job.inputs["images"]):
            item = by_index.get(index)
            if item is None:
                out.append({"name": name, "skipped": skipped.get(name, "not read")})
                continue
            answer = {"name": name, "image_score": item.image_score,
                      "max_pixel_score": item.max_pixel_score,
                      "verdict": "NG" if item.max_pixel_score > threshold else "OK"}
            if mask == "png":
                png = self.service.render(client, job.id, index, "mask", threshold)
                answer["mask"] = base64.b64encode(png).decode()
            elif mask == "rle":
                answer["mask"] = rle(self.service.picture(client, job.id, index, "mask",
                                                          threshold))
            out.append(answer)
        return out

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(openapi_schema(self.service))


def openapi_schema(service: Service) -> dict:
    """The OpenAPI 3.1 description of the line's API (and of the jobs the page uses)."""
    image_answer = {"type": "object", "properties": {
        "name": {"type": "string"},
        "image_score": {"type": "number", "description": "mean of the 2000 largest pixels of "
                        "each branch, added (0 to 2)"},
        "max_pixel_score": {"type": "number"},
        "verdict": {"type": "string", "enum": ["OK", "NG"],
                    "description": "NG when max_pixel_score > threshold"},
        "mask": {"description": "with mask=png: the 0/255 mask as base64 PNG; with mask=rle: "
                 "{size: [H, W], counts: [...]}, run lengths row by row starting with 0s",
                 "oneOf": [{"type": "string"}, {"type": "object"}]},
        "skipped": {"type": "string", "description": "why the file could not be read"}}}
    error = {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
    limits = service.limits
    return {"openapi": "3.1.0", "info": {"title": "VCP-CLIP inspection service",
                                         "version": "1"},
            "components": {"securitySchemes": {"token": {"type": "http", "scheme": "bearer"}}},
            "security": [{"token": []}],
            "paths": {"/api/v1/predict": {"post": {
                "summary": f"score up to {limits.sync_images} images and answer at once",
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", "required": ["images"], "properties": {
                        "images": {"type": "array", "items": {"type": "string",
                                                              "format": "binary"}},
                        "threshold": {"type": "number", "description": "T; default the "
                                      f"server's ({service.info['threshold']})"},
                        "mask": {"type": "string", "enum": ["none", "png", "rle"],
                                 "default": "none"}}}}}},
                "responses": {
                    "200": {"description": "one object per image, in input order",
                            "content": {"application/json": {"schema": {
                                "type": "object", "properties": {
                                    "threshold": {"type": "number"},
                                    "images": {"type": "array", "items": image_answer}}}}}},
                    "400": {"description": "bad input", **error},
                    "401": {"description": "token missing or wrong", **error},
                    "403": {"description": "host or origin refused", **error},
                    "413": {"description": "over a limit (request size, files, pixels, "
                            "memory or disk held)", **error}}}},
                "/api/jobs": {"post": {"summary": "queue a job (the page's form: kind, images, "
                                       "images_folder, normal, defective, false_alarm_rate)",
                                       "responses": {"200": {"description": "{job: id}"}}}},
                "/api/jobs/{job}": {
                    "get": {"summary": "progress, queue position, results from ?since=N",
                            "responses": {"200": {"description": "status"},
                                          "404": {"description": "no such job of yours"},
                                          "410": {"description": "expired or deleted"}}},
                    "delete": {"summary": "cancel a waiting or running job, drop a finished one",
                               "responses": {"200": {"description": "{state}"}}}}}}


def create_app(service: Service, access: Access = Access()) -> Guard:
    """The ASGI app: ``Guard`` around the routes; stopping it closes the service."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    e = Endpoints(service)
    jobs = "/api/jobs/{job}"
    routes = [
        Route("/", e.page), Route("/api/info", e.describe),
        Route("/api/jobs", answers(e.create), methods=["POST"]),
        Route(jobs, answers(e.status)),
        Route(jobs, answers(e.cancel), methods=["DELETE"]),
        Route(jobs + "/{what:str}/{index:int}.png", answers(e.picture)),
        Route(jobs + "/map/{index:int}", answers(e.map_data)),
        Route(jobs + "/scores.csv", answers(e.scores)),
        Route(jobs + "/masks.zip", answers(e.masks_zip)),
        Route("/api/v1/predict", answers(e.predict), methods=["POST"]),
        Route("/api/v1/openapi.json", e.openapi),
    ]
    return Guard(Starlette(routes=routes, lifespan=lifespan), access, service.limits.request_bytes)
