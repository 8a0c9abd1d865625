"""The inspection service over HTTP (FastAPI on Starlette): the page ``web/page.html``, its JSON
and PNG endpoints, and the line's API ``POST /api/v1/predict`` with the product profiles
``/api/v1/profiles/{name}``; the OpenAPI document ``GET /api/v1/openapi.json`` is generated
from the models of ``utils/serving/schemas.py`` and ``GET /api/v1/docs`` (``web/api.html``)
draws it, with a form to try each endpoint.

    app = create_app(Service(predictor, limits), Access(token=None, hosts=["line3.local"]))

``Guard`` stands in front of every request, before its body is read: the ``Host`` header must
name this server (loopback names and the allowed hosts: a page of another site cannot reach it
through DNS rebinding), a cross-site ``Origin`` cannot post, the token is checked where there is
one (``Authorization: Bearer``, the ``token`` query parameter once, then a cookie), the body is
counted against the request limit, each browser gets an unguessable client cookie that scopes its
jobs, and an unexpected error answers 500 with one line and no traceback. Errors are
``{"error": message}`` with 400 (bad input), 401/403 (token, host), 404 (not yours or no such
thing), 410 (expired), 413 (over a limit), 422 (a field that does not fit, named).

A new endpoint is a function on ``api`` (or on ``uploads`` when it takes files: their room is
reserved before they are read), its form and answer models in ``schemas.py``; ``ServiceDep`` and
``ClientDep`` give it the service and the client; the guard and the error answers come with it.
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import secrets
import zipfile
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from utils.errors import InputError, UsageError
from utils.data.images import IMAGE_EXTENSIONS
from utils.inference.outputs import scores_csv
from utils.paths import ROOT
from utils.serving.connections import log_loop_errors
from utils.serving.schemas import (Cancelled, Error, Finite, Info, JobCreated, JobForm,
                                   JobStatus, MapData, PredictAnswer, PredictForm, ProfileDeleted,
                                   ProfileForm, ProfileSummary, ScoringForm)
from utils.serving.service import (GROUPS, PICTURES, Gone, Job, LimitError, NotFound, Scoring,
                                   Service, removed_on_error, safe_name)

__all__ = ["Access", "LOOPBACK", "create_app", "rle", "api", "uploads", "ServiceDep", "ClientDep"]

log = logging.getLogger("vcp.web")
PAGE, DOCS = ROOT / "web" / "page.html", ROOT / "web" / "api.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
CLIENT_COOKIE, TOKEN_COOKIE = "vcp_client", "vcp_token"
STATUS = {LimitError: 413, NotFound: 404, Gone: 410}
# A refused request's body, up to this size and time, is read and dropped before the answer, so
# that a client still sending it reads the answer instead of a reset connection (as a server's
# lingering close does); a longer body is answered at once.
DRAIN_BYTES, DRAIN_SECONDS = 32 * 2**20, 10.0
INTERNAL = "internal error; the server's log names it"


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
                await _error(INTERNAL, 500)(
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


# ---- what every endpoint may ask for -----------------------------------------------------------
async def service_of(request: Request) -> Service:
    return request.app.state.service


async def client_of(request: Request) -> str:
    """The client's id, from its cookie (``Guard`` gives each browser one)."""
    return request.scope["state"]["client"]


ServiceDep = Annotated[Service, Depends(service_of)]
ClientDep = Annotated[str, Depends(client_of)]


class UploadRoute(APIRoute):
    """A route whose body is a form of uploads: room for it is reserved before it is read (a
    request that cannot fit is refused unread), and a form over the parser's limits is a
    ``LimitError``."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def reserved(request: Request) -> Response:
            (await service_of(request)).reserve(await client_of(request),
                                                int(request.headers.get("content-length", 0)))
            try:
                return await handler(request)
            except HTTPException as e:  # Starlette's form parser: too many files or fields
                if e.status_code == 400 and str(e.detail).startswith("Too many"):
                    raise LimitError(f"the form is too large: {e.detail}") from None
                raise
        return reserved


REFUSALS = {status: {"model": Error, "description": what} for status, what in [
    (400, "bad input"), (401, "token missing or wrong"), (403, "host or origin refused"),
    (404, "not yours, or no such thing"), (410, "expired or deleted"),
    (413, "over a limit (request size, files, pixels, memory or disk held, profiles)"),
    (422, "a field that does not fit, named")]}
PNG = {200: {"content": {"image/png": {}}, "description": "a PNG"}}

pages = APIRouter(include_in_schema=False)  # the page itself
api = APIRouter(responses=REFUSALS)  # JSON and pictures
uploads = APIRouter(route_class=UploadRoute, responses=REFUSALS)  # forms with files


@pages.get("/")
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(), headers={"X-Frame-Options": "DENY"})


@pages.get("/api/v1/docs")
async def docs() -> HTMLResponse:
    """The API's interactive documentation: a page of ours that reads the OpenAPI document
    (FastAPI's own docs pages load their scripts from a CDN)."""
    return HTMLResponse(DOCS.read_text(), headers={"X-Frame-Options": "DENY"})


@api.get("/api/info", response_model=Info, summary="the model, T and limits the page shows")
async def describe(service: ServiceDep) -> dict:
    return service.info


def at_most(count: int, limit: int) -> None:
    if count > limit:
        raise LimitError(f"too many files in one request: this server takes at most {limit}")


def _save(uploads: list[UploadFile], folder: Path) -> list[tuple[Path, str]]:
    """Each upload in ``folder`` under a name of ours (its extension kept), with its own name
    checked; in a worker thread."""
    names = [safe_name(u.filename or "") for u in uploads]
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


def _scoring(form: ScoringForm, folder: Path, service: Service,
             profile: str | None = None) -> Scoring | None:
    """A job's own scoring from a form's fields (its reference uploads saved in ``folder``, a
    shared folder's listed), or the ``profile``'s; None: the server's. In a worker thread."""
    references = _gathered(form.references, form.references_folder, folder / "references",
                           service)
    return service.scoring(references, form.scoring, form.fusion, {"coreset": form.coreset},
                           profile or None)


def _gathered(files: list[UploadFile], shared: str, folder: Path,
              service: Service) -> list[tuple[Path, str]]:
    """(path, name as given) of a group's uploads, saved in ``folder``, then of the images of
    the ``shared`` folder it names (none: empty). In a worker thread."""
    saved = _save(files, folder)
    return saved + service.folders.images(shared.strip()) if shared.strip() else saved


async def _finished(job: Job) -> Job:
    """A job that a request waits for, once it is over; its error (or a stop) as a refusal."""
    while not job.over.is_set():
        await asyncio.sleep(0.01)
    if job.error or job.state != "finished":
        raise UsageError(job.error or "the server stopped before this request was done")
    return job


@uploads.post("/api/jobs", response_model=JobCreated,
              summary="queue a job of the page: inspect images, or calibrate T")
async def create(form: Annotated[JobForm, File()], service: ServiceDep,
                 client: ClientDep) -> dict:
    groups = GROUPS[form.kind]
    at_most(sum(len(getattr(form, g)) for g in (*groups, "references")),
            service.limits.files_per_job)
    folder = service.new_folder()

    def queue():  # a worker thread: save the uploads, list the shared folders
        with removed_on_error(folder):
            inputs = {g: _gathered(getattr(form, g), getattr(form, f"{g}_folder"), folder / g,
                                   service) for g in groups}
            if not inputs[groups[0]]:
                what = "images" if groups[0] == "images" else f"{groups[0]} images"
                raise UsageError(f"no {what} given: choose image files"
                                 + (" or name a shared folder" if service.folders.roots else ""))
            scoring = _scoring(form, folder, service, form.profile)
        return service.submit(client, form.kind, inputs, folder, form.false_alarm_rate,
                              scoring=scoring, tile=form.tile)
    return {"job": (await run_in_threadpool(queue)).id}


@api.get("/api/jobs/{job}", response_model=JobStatus,
         summary="progress, queue position, and the results from ?since=N")
async def status(job: str, service: ServiceDep, client: ClientDep,
                 since: Annotated[int, Query(ge=0, description="results from this one")] = 0,
                 skipped_since: Annotated[int, Query(ge=0, description="skipped files from "
                                                     "this one")] = 0) -> dict:
    return service.status(client, job, since, skipped_since)


@api.delete("/api/jobs/{job}", response_model=Cancelled,
            summary="cancel a waiting or running job, drop a finished one")
async def cancel(job: str, service: ServiceDep, client: ClientDep) -> dict:
    return {"job": job, "state": service.cancel(client, job)}


@api.get("/api/jobs/{job}/{what}/{index}.png", response_class=Response, responses=PNG,
         summary="an image of a job: image, overlay (its heat map) or mask (map > threshold)")
async def picture(job: str, what: str, index: int, service: ServiceDep, client: ClientDep,
                  threshold: Annotated[Finite | None, Query(description="T (a mask)")] = None,
                  side: Annotated[int | None, Query(ge=1, description="longest side at most")]
                  = None) -> Response:
    if what not in PICTURES:
        raise NotFound(f"no {what[:20]!r} picture: expected one of {', '.join(PICTURES)}")
    if what == "mask" and threshold is None:
        raise UsageError("threshold: a mask needs one")
    png = await run_in_threadpool(service.render, client, job, index, what,
                                  threshold if what == "mask" else None, side)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private"})


@api.get("/api/jobs/{job}/map/{index}", response_model=MapData,
         summary="an image's heat map, at most 128 a side (the page draws contours from it)")
async def map_data(job: str, index: int, service: ServiceDep, client: ClientDep) -> dict:
    data = service.map_data(client, job, index)
    return {**data, "data": base64.b64encode(data["data"]).decode()}


@api.get("/api/jobs/{job}/scores.csv", response_class=Response,
         responses={200: {"content": {"text/csv": {}}, "description": "predict.py's columns"}},
         summary="the job's scores, as predict.py writes them")
async def scores(job: str, service: ServiceDep, client: ClientDep) -> Response:
    rows = [i.row() for i in list(service.job(client, job).items)]
    return Response(scores_csv(rows), media_type="text/csv",
                    headers={"Content-Disposition": 'attachment; filename="scores.csv"'})


@api.get("/api/jobs/{job}/masks.zip", response_class=Response,
         responses={200: {"content": {"application/zip": {}}, "description": "masks/*.png"}},
         summary="the job's masks at T, as predict.py --threshold writes them")
async def masks_zip(job: str, threshold: Annotated[Finite, Query(description="T")],
                    service: ServiceDep, client: ClientDep) -> Response:
    items = list(service.job(client, job).items)
    if items:
        service.job(client, job).item(items[0].index)  # a calibration job: refused

    def pack() -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for i in items:
                z.writestr(f"masks/{i.stem}.png",
                           service.render(client, job, i.index, "mask", threshold))
        return buf.getvalue()
    return Response(await run_in_threadpool(pack), media_type="application/zip",
                    headers={"Content-Disposition": 'attachment; filename="masks.zip"'})


def rle(mask: np.ndarray) -> dict:
    """A 0/255 mask [H, W] as run lengths, row by row, starting with a run of 0s."""
    flat = mask.ravel() > 0
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]]))
    counts = ([0] if flat.size and flat[0] else []) + runs.tolist()
    return {"size": list(mask.shape), "counts": counts}


@uploads.post("/api/v1/predict", response_model=PredictAnswer, response_model_exclude_none=True,
              summary="score a few images (16 by default) and answer at once, in input order")
async def predict(form: Annotated[PredictForm, File()], service: ServiceDep, client: ClientDep,
                  profile: Annotated[str | None, Query(description="a product profile (or the "
                                                       "form's profile)")] = None) -> dict:
    at_most(len(form.images), service.limits.sync_images)
    at_most(len(form.images) + len(form.references), service.limits.files_per_job)
    if form.profile and profile and form.profile != profile:
        raise UsageError("profile: given twice (the form's and ?profile=), differently")
    folder = service.new_folder()

    def queue():
        with removed_on_error(folder):
            inputs = {"images": _save(form.images, folder / "images")}
            scoring = _scoring(form, folder, service, form.profile or profile)
        return service.submit(client, "inspect", inputs, folder, scoring=scoring,
                              tile=form.tile)
    job = await run_in_threadpool(queue)
    try:
        await _finished(job)
        used = job.profile or {}
        threshold = next(t for t in (form.threshold, used.get("threshold"),
                                     service.info["threshold"]) if t is not None)
        images = await run_in_threadpool(_answers, service, job, threshold, form.mask, client)
    finally:
        service.delete(job)
    return {"threshold": threshold, "profile": used.get("name"), "tile": job.tile or None,
            "images": images}


def _answers(service: Service, job, threshold: float, mask: str, client: str) -> list[dict]:
    """One answer per input image, in input order (a worker thread: masks are drawn)."""
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
            png = service.render(client, job.id, index, "mask", threshold)
            answer["mask"] = base64.b64encode(png).decode()
        elif mask == "rle":
            answer["mask"] = rle(service.picture(client, job.id, index, "mask", threshold))
        out.append(answer)
    return out


# ---- product profiles: shared by every client of the server ----------------------------------
PROFILE = "/api/v1/profiles/{name:path}"  # any text, so that a bad name is a 400 naming it


@api.get("/api/v1/profiles", response_model=list[ProfileSummary],
         summary="the product profiles, by name")
async def list_profiles(service: ServiceDep) -> list[dict]:
    return await run_in_threadpool(lambda: service.profile_store().list())


@uploads.put(PROFILE, response_model=ProfileSummary,
             summary="create or replace a product profile (its normal references, scoring and "
                     "T); answers once its reference memory is built and written")
async def save_profile(name: str, form: Annotated[ProfileForm, File()], service: ServiceDep,
                       client: ClientDep) -> dict:
    at_most(len(form.references), service.limits.files_per_job)
    folder = service.new_folder()

    def queue():
        with removed_on_error(folder):
            scoring = _scoring(form, folder, service)
        return service.save_profile(client, name, scoring, folder, form.threshold,
                                    form.tile)
    job = await run_in_threadpool(queue)
    try:
        await _finished(job)
    finally:
        service.delete(job)
    return job.profile


@api.get(PROFILE, response_model=ProfileSummary, summary="one product profile")
async def read_profile(name: str, service: ServiceDep) -> dict:
    return (await run_in_threadpool(service.profile_store().read, name)).summary()


@api.delete(PROFILE, response_model=ProfileDeleted, summary="delete a product profile")
async def delete_profile(name: str, service: ServiceDep) -> dict:
    await run_in_threadpool(service.profile_store().delete, name)
    return {"profile": name, "state": "deleted"}


# ---- errors as {"error": one line} -------------------------------------------------------------
def _refused(request: Request, e: InputError) -> JSONResponse:
    return _error(str(e), next((s for t, s in STATUS.items() if isinstance(e, t)), 400))


def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    """422 naming each field that does not fit, and what was given where it is short text."""
    def one(err: dict) -> str:
        field = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        given = err.get("input")
        got = f", got {given[:40]!r}" if isinstance(given, str) and err["type"] != "missing" \
            else ""
        return f"{field or 'request'}: {err['msg']}{got}"
    return _error("; ".join(one(err) for err in e.errors()), 422)


def _http(request: Request, e: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(e.detail)}, status_code=e.status_code, headers=e.headers)


def _with_token(schema: dict) -> dict:
    """The OpenAPI document with the server's bearer token (``Guard`` checks it)."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "token": {"type": "http", "scheme": "bearer"}}
    schema["security"] = [{"token": []}]
    return schema


def create_app(service: Service, access: Access = Access()) -> FastAPI:
    """The ASGI app: ``Guard`` in front of the routes; the event loop's errors logged in one
    line; stopping it closes the service."""
    @asynccontextmanager
    async def lifespan(app):
        asyncio.get_running_loop().set_exception_handler(log_loop_errors)
        yield
        service.close()

    limits = service.limits
    app = FastAPI(title="VCP-CLIP inspection service", version="1", lifespan=lifespan,
                  openapi_url="/api/v1/openapi.json", docs_url=None, redoc_url=None,
                  form_limits={"max_files": max(limits.files_per_job, limits.sync_images),
                               "max_fields": 100},
                  exception_handlers={InputError: _refused, RequestValidationError: _invalid,
                                      HTTPException: _http})
    app.state.service = service
    for router in (pages, api, uploads):
        app.include_router(router)
    app.openapi_schema = _with_token(app.openapi())
    app.add_middleware(Guard, access=access, request_bytes=limits.request_bytes)
    return app
