"""The inspection page: drop images, see their heat maps and masks, set the threshold, calibrate it.

    python app.py --checkpoint_path vcp_weight/train_visa.pth [--host 127.0.0.1] [--port 7860]
    make app          # with the demo's checkpoint, after `make demo`

Serves ``web/page.html`` and a few JSON/PNG endpoints (Starlette on uvicorn). Images go through
the prediction service ``utils/prediction.py`` exactly as with ``predict.py``; the server keeps each
image's map at the model's resolution, so a new threshold only resizes a kept map and compares it
(no model run). The model runs one job at a time in a worker thread; the page polls for progress.
A job's uploads live in a temporary folder until the job is dropped (the last ``KEEP_JOBS`` are
kept) or the server stops.

The page reads any folder the server can read: serve it on 127.0.0.1 (the default) or on a network
you trust.
"""
from __future__ import annotations

import argparse
import io
import itertools
import shutil
import socket
import sys
import tempfile
import threading
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from utils.calibration import calibrate
from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, add_onnx_flag,
                       add_scoring_flags, at_least, fail, predictor_of)
from utils.errors import UsageError
from utils.images import expand_inputs, read_rgb, unique_names
from utils.outputs import binary_mask, full_size, overlay, scores_csv
from utils.paths import DEFAULT_CHECKPOINT
from utils.prediction import Prediction, Predictor
from utils.visualize import png_bytes

PAGE = Path(__file__).resolve().parent / "web" / "page.html"
KEEP_JOBS = 8  # jobs whose maps and uploads are kept; older ones are dropped
GROUPS = {"inspect": ("images",), "calibrate": ("normal", "defective")}  # kind -> input groups


@dataclass
class Item:
    """One predicted image of a job; ``amap`` [S, S] float32 is kept for inspection only."""

    index: int  # position in the job's list of images
    group: str
    source: str  # the uploaded file's name, or the path on the server
    name: str  # unique output name (masks.zip)
    path: Path
    size: tuple[int, int]  # the image's (width, height)
    image_score: float
    max_pixel_score: float
    amap: np.ndarray | None

    def summary(self) -> dict:
        return {"index": self.index, "name": self.source, "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}

    def row(self) -> dict:
        """This image's line of scores.csv, as predict.py writes it."""
        return {"path": self.source, "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}


@dataclass
class Job:
    kind: str  # "inspect" or "calibrate"
    inputs: dict[str, list[tuple[Path, str]]]  # group -> (path, source) of each image
    folder: Path  # the uploads; removed with the job
    false_alarm_rate: float = 0.0
    done: int = 0
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    calibration: dict | None = None
    error: str | None = None
    finished: bool = False

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.inputs.values())

    def run(self, predict_images: Predictor) -> None:
        """Predict every group in order (in the worker thread); never raises."""
        try:
            for group, inputs in self.inputs.items():
                paths = [p for p, _ in inputs]
                names = unique_names(paths)
                for result in predict_images(paths):
                    path, source = inputs[result.index]
                    if isinstance(result, Prediction):
                        with Image.open(path) as im:
                            size = im.size
                        self.items.append(Item(
                            result.index, group, source, names[result.index], path, size,
                            result.image_score, result.max_pixel_score,
                            result.amap if self.kind == "inspect" else None))
                    else:
                        self.skipped.append({"name": source, "reason": result.reason})
                    self.done += 1
            if self.kind == "calibrate":
                scores = {g: [i.max_pixel_score for i in self.items if i.group == g]
                          for g in GROUPS["calibrate"]}
                if not scores["normal"]:
                    raise UsageError("none of the normal images could be read")
                self.calibration = calibrate(scores["normal"], self.false_alarm_rate,
                                             scores["defective"]).to_dict()
        except Exception as e:  # reported on the page; the server keeps serving
            self.error = str(e) if isinstance(e, INPUT_ERRORS) else f"{type(e).__name__}: {e}"
        finally:
            self.finished = True

    def status(self) -> dict:
        items = list(self.items)  # a snapshot: the worker thread appends
        return {"kind": self.kind, "total": self.total, "done": self.done,
                "finished": self.finished, "error": self.error, "skipped": list(self.skipped),
                "results": [i.summary() for i in items], "calibration": self.calibration}

    def item(self, index: int) -> Item:
        for i in self.items:
            if i.index == index and i.amap is not None:
                return i
        raise KeyError(f"image {index} is not in this job")


def _error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _png(rgb_or_grey: np.ndarray) -> Response:
    return Response(png_bytes(rgb_or_grey), media_type="image/png")


def _threshold(request: Request) -> float:
    text = request.query_params.get("threshold", "")
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"threshold: expected a number, got {text!r}") from None


class Inspector:
    """The page's state: the model (a ``Predictor``), the jobs and the one worker thread."""

    def __init__(self, predict_images: Predictor, threshold: float = 0.5,
                 description: str = ""):
        self.predict_images = predict_images
        self.info = {"model": description, "threshold": threshold}
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="predict")
        self.root = Path(tempfile.mkdtemp(prefix="vcp_app_"))

    def close(self) -> None:
        self.worker.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- endpoints -------------------------------------------------------------------------
    async def page(self, request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    async def describe(self, request: Request) -> JSONResponse:
        return JSONResponse(self.info)

    async def create(self, request: Request) -> JSONResponse:
        """A new job from the form: files and/or a server folder per input group."""
        folder = Path(tempfile.mkdtemp(dir=self.root))
        try:
            form = await request.form(max_files=100_000, max_fields=1_000)
            job = await self._job(form, folder)
        except INPUT_ERRORS as e:
            shutil.rmtree(folder, ignore_errors=True)
            return _error(str(e))
        with self.lock:
            job_id = str(next(self.ids))
            self.jobs[job_id] = job
            self._forget_old()
        self.worker.submit(job.run, self.predict_images)
        return JSONResponse({"job": job_id})

    async def status(self, request: Request) -> JSONResponse:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            return _error(f"no job {request.path_params['job']} (the server keeps the last "
                          f"{KEEP_JOBS}): run it again", 404)
        return JSONResponse(job.status())

    async def image(self, request: Request) -> Response:
        return await self._render(request, lambda item: np.asarray(read_rgb(item.path)))

    async def overlay(self, request: Request) -> Response:
        def draw(item: Item) -> np.ndarray:
            image = np.asarray(read_rgb(item.path))  # [H, W, 3]
            return overlay(image, full_size(item.amap, item.size))
        return await self._render(request, draw)

    async def mask(self, request: Request) -> Response:
        try:
            threshold = _threshold(request)
        except UsageError as e:
            return _error(str(e))
        return await self._render(
            request, lambda item: binary_mask(full_size(item.amap, item.size), threshold))

    async def scores(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            return _error("no such job", 404)
        return Response(scores_csv([i.row() for i in job.items]), media_type="text/csv",
                        headers={"Content-Disposition": 'attachment; filename="scores.csv"'})

    async def masks_zip(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job"])
        if job is None:
            return _error("no such job", 404)
        try:
            threshold = _threshold(request)
        except UsageError as e:
            return _error(str(e))

        def pack() -> bytes:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                for i in job.items:
                    mask = binary_mask(full_size(i.amap, i.size), threshold)
                    z.writestr(f"masks/{i.name}.png", png_bytes(mask))
            return buf.getvalue()
        return Response(await run_in_threadpool(pack), media_type="application/zip",
                        headers={"Content-Disposition": 'attachment; filename="masks.zip"'})

    # -- helpers ---------------------------------------------------------------------------
    async def _job(self, form, folder: Path) -> Job:
        kind = form.get("kind")
        if kind not in GROUPS:
            raise UsageError(f"kind: expected one of {sorted(GROUPS)}, got {kind!r}")
        inputs = {}
        for group in GROUPS[kind]:
            uploads = [f for f in form.getlist(group) if isinstance(f, UploadFile) and f.filename]
            inputs[group] = [(await self._save(f, folder / group), f.filename) for f in uploads]
            server_folder = str(form.get(f"{group}_folder") or "").strip()
            if server_folder:
                found = expand_inputs([server_folder])
                if not found:
                    raise UsageError(f"{server_folder}: no image files in this folder")
                inputs[group] += [(p, str(p)) for p in found]
        first = GROUPS[kind][0]
        if not inputs[first]:
            what = "images" if first == "images" else f"{first} images"
            raise UsageError(f"no {what} given: choose image files or name a folder on the "
                             "server")
        rate = 0.0
        if kind == "calibrate":
            text = str(form.get("false_alarm_rate", "0.01"))
            try:
                rate = float(text)
            except ValueError:
                rate = float("nan")
            if not 0.0 <= rate < 1.0:
                raise UsageError(f"false-alarm rate: expected a number in [0, 1), got {text!r}")
        return Job(kind, inputs, folder, rate)

    @staticmethod
    async def _save(upload: UploadFile, folder: Path) -> Path:
        """The upload in ``folder`` under its own name (``_1``, ``_2``, ... where names repeat):
        a group's uploads share one folder, as the images of a folder given to predict.py."""
        folder.mkdir(parents=True, exist_ok=True)
        name = Path(upload.filename).name  # the name only, never a path from outside
        path = folder / (name if name not in ("", ".", "..") else "upload")
        stem, suffix = path.stem, path.suffix
        for k in itertools.count(1):
            if not path.exists():
                break
            path = folder / f"{stem}_{k}{suffix}"
        with open(path, "wb") as f:
            await run_in_threadpool(shutil.copyfileobj, upload.file, f)
        return path

    def _forget_old(self) -> None:
        while len(self.jobs) > KEEP_JOBS:
            oldest = next(iter(self.jobs))
            if not self.jobs[oldest].finished:
                break
            shutil.rmtree(self.jobs.pop(oldest).folder, ignore_errors=True)

    async def _render(self, request: Request, draw) -> Response:
        job = self.jobs.get(request.path_params["job"])
        try:
            if job is None:
                raise KeyError("no such job")
            item = job.item(request.path_params["index"])
        except KeyError as e:
            return _error(str(e.args[0]), 404)
        return _png(await run_in_threadpool(draw, item))


def create_app(inspector: Inspector) -> Starlette:
    @asynccontextmanager
    async def lifespan(app):
        yield
        inspector.close()

    jobs = "/api/jobs/{job}"
    return Starlette(routes=[
        Route("/", inspector.page),
        Route("/api/info", inspector.describe),
        Route("/api/jobs", inspector.create, methods=["POST"]),
        Route(jobs, inspector.status),
        Route(jobs + "/image/{index:int}.png", inspector.image),
        Route(jobs + "/overlay/{index:int}.png", inspector.overlay),
        Route(jobs + "/mask/{index:int}.png", inspector.mask),
        Route(jobs + "/scores.csv", inspector.scores),
        Route(jobs + "/masks.zip", inspector.masks_zip),
    ], lifespan=lifespan)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="The inspection page: images, heat maps, masks, the "
                                   "threshold and its calibration in a browser")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=at_least(0), default=7860, help="default 7860; 0: any free one")
    p.add_argument("--threshold", type=float, default=0.5, help="the slider's first position")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.set_defaults(num_workers=0)  # the images load in the worker thread, no processes
    add_scoring_flags(p, references="paths")  # as predict.py (an upload is a folder)
    add_onnx_flag(p)
    add_model_flags(p)
    return p.parse_args(argv)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free one); a taken port is a usage error."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") \
            from None
    return sock


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sock = listen(args.host, args.port)  # a taken port fails before the model loads
        predict_images = predictor_of(args)
    except INPUT_ERRORS as e:
        return fail(e)
    name = predict_images.strategy.name
    scoring = (f", {args.fusion} fusion with {len(args.reference)} reference input(s)"
               if args.reference else f", {name} scoring" if name != "zero_shot" else ", zero-shot")
    source = f"ONNX {args.onnx}" if args.onnx else f"checkpoint {args.checkpoint_path}"
    inspector = Inspector(predict_images, args.threshold, f"{source}{scoring}")
    host, port = sock.getsockname()[:2]
    print(f"serving the inspection page on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    uvicorn.Server(uvicorn.Config(create_app(inspector), log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
