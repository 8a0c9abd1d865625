"""The inspection service: jobs of images through one ``Predictor`` (the code ``predict.py`` runs),
shared by the inspection page and the HTTP API (``utils/serving/web.py``).

    service = Service(predictor, Limits(), folders=["/data/line3"])
    job = service.submit(client, "inspect", {"images": [(path, name), ...]}, folder)
    service.status(client, job.id, since=0)      # progress, queue position, new results
    service.render(client, job.id, 0, "overlay") # PNG bytes at most Limits.output_side a side
    scoring = service.scoring(references=[(path, name), ...], options={"coreset": 0.1})
    job = service.submit(client, "inspect", inputs, folder, scoring=scoring)  # its own scoring
    job = service.save_profile(client, "bracket-7", scoring, folder, threshold=0.4)
    scoring = service.scoring(profile="bracket-7")  # its references, settings, cached memory

What keeps it safe and steady (docs/app.md):

- a job belongs to the client that made it: another client's id is "no such job";
  ids are ``secrets.token_urlsafe`` (unguessable);
- one worker thread runs the model; waiting jobs are served round-robin across clients (next:
  the oldest job of the client served longest ago), so a one-image job waits for at most one
  job of each other client, never for another client's long queue;
- jobs are kept while the memory (their maps) and disk (their uploads) they hold fit the limits;
  the oldest finished job of the client holding the most is dropped first, and its id then says
  that it expired; a job that cannot fit is refused (``LimitError``, HTTP 413);
- server-side folders are read only under the roots given (real paths: a symlink that leads out
  is not followed), without globs, regular files only, with a time and a count limit;
- every image's pixel count is checked from its header before it is decoded;
- what is rendered is at most ``output_side`` pixels a side (a preview is made once per big image);
- messages name the user's files by the names the user gave, never the server's paths;
- a job may bring its own scoring (``Scoring``: a strategy of ``utils/scoring`` with its options,
  fusion and normal reference images, or a product profile's, ``utils/serving/profiles.py``); the
  server's scoring is the default. Its reference memory is built (or read from the profile's
  cache) when it runs, counts against the memory limit while it runs, and is dropped after;
- the uploads live in a folder of the system's temporary folder, locked while the server runs; a
  start removes the upload folders of servers that were killed.
"""
from __future__ import annotations

import fcntl
import itertools
import logging
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
import warnings
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils.evaluation.calibration import calibrate
from utils.errors import InputError, UsageError
from utils.data.images import IMAGE_EXTENSIONS, read_rgb, shown_size, unique_names
from utils.inference.outputs import binary_mask, capped_size, full_size, overlay
from utils.inference.prediction import Prediction, Predictor
from utils.inference.tiling import Tiling
from utils.evaluation.visualize import png_bytes
from utils.scoring import FUSIONS, STRATEGIES, Context, Strategy, make_strategy
from utils.serving.errors import Gone, LimitError, NotFound
from utils.serving.profiles import Profile, Profiles, check_name, model_key

__all__ = ["Limits", "LimitError", "NotFound", "Gone", "Folders", "safe_name", "check_pixels",
           "Scoring", "Job", "Service", "GROUPS", "PICTURES", "removed_on_error", "draw"]

log = logging.getLogger("vcp.service")
PICTURES = ("image", "overlay", "mask")
GROUPS = {"inspect": ("images",), "calibrate": ("normal", "defective")}  # kind -> input groups
MiB = 2 ** 20
UPLOADS = "vcp_app_"  # the upload folders' prefix in the system's temporary folder
OWNER = ".owner"  # the file in an upload folder that its server holds locked


@dataclass(frozen=True)
class Limits:
    """What one request, one job and the whole server may take."""

    request_bytes: int = 256 * MiB  # one request's body
    files_per_job: int = 1000
    pixels_per_image: int = 200_000_000  # width x height, read off the header (13000^2 passes)
    disk_bytes: int = 4096 * MiB  # uploads and previews of all jobs kept
    memory_bytes: int = 2048 * MiB  # maps of all jobs kept
    jobs_waiting_per_client: int = 64
    folder_entries: int = 20_000  # entries looked at in one server folder
    folder_seconds: float = 5.0  # time to list one server folder
    sync_images: int = 16  # images of one synchronous API call
    output_side: int = 2048  # longest side of an image, overlay or mask that is rendered


def safe_name(name: str) -> str:
    """An uploaded file's name without any folder part; one that cannot be a file name (control
    characters, over 255 bytes, empty) is refused."""
    base = re.split(r"[/\\]", name)[-1]
    shown = repr(base[:40] + ("..." if len(base) > 40 else ""))
    if any(ord(c) < 32 or ord(c) == 127 for c in base):
        raise UsageError(f"file name {shown}: control characters are not allowed")
    if len(base.encode("utf-8", "replace")) > 255:
        raise UsageError(f"file name {shown}: longer than 255 bytes")
    if base in ("", ".", ".."):
        raise UsageError(f"file name {shown}: not a file name")
    return base


def check_pixels(path: Path, name: str, limit: int) -> None:
    """Refuse an image with more than ``limit`` pixels from its header (nothing is decoded);
    a file that is no image passes (the prediction reports it as skipped)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size
    except Image.DecompressionBombError:
        width = height = math.inf
    except Exception:  # not an image: skipped later, with the reason
        return
    if width * height > limit:
        size = "" if width == math.inf else f" ({width}x{height})"
        raise LimitError(f"{name}: the image is too large{size}: this server takes at most "
                         f"{limit:,} pixels per image")


class Folders:
    """The server-side folders a request may name: only under ``roots`` (real paths, so a symlink
    that leads out is not followed), each one a plain folder of image files (no globs, no
    subfolders, regular files only)."""

    def __init__(self, roots: list[str | Path], limits: Limits):
        self.roots = [Path(os.path.realpath(r)) for r in roots]
        self.limits = limits
        for given, real in zip(roots, self.roots):
            if not real.is_dir():
                raise UsageError(f"{given}: not a folder", option="allow_folder")

    def _inside(self, path: Path) -> bool:
        return any(path.is_relative_to(r) for r in self.roots)

    def images(self, text: str) -> list[tuple[Path, str]]:
        """(real path, name as given) of each image of the folder ``text`` (absolute, or
        relative to the first root), sorted by name."""
        if not self.roots:
            raise UsageError("this server reads no folders of its own: upload the images")
        if "\x00" in text:
            raise UsageError("folder: control characters are not allowed")
        given = Path(text) if os.path.isabs(text) else self.roots[0] / text
        real = Path(os.path.realpath(given))
        if not self._inside(real) or not real.is_dir():
            raise UsageError(f"{text}: not a folder that this server shares (its shared folders "
                             f"are {', '.join(r.name for r in self.roots)})")
        return self._list(real, text.rstrip("/"))

    def _list(self, folder: Path, shown: str) -> list[tuple[Path, str]]:
        found, deadline = [], time.monotonic() + self.limits.folder_seconds
        with os.scandir(folder) as entries:
            for k, entry in enumerate(entries):
                if k >= self.limits.folder_entries or time.monotonic() > deadline:
                    raise LimitError(f"{shown}: too many entries to list (this server looks at "
                                     f"{self.limits.folder_entries:,} at most)")
                if Path(entry.name).suffix.lower() not in IMAGE_EXTENSIONS:
                    continue
                real = Path(os.path.realpath(entry.path))
                if self._inside(real) and _is_regular(real):
                    found.append((real, f"{shown}/{entry.name}"))
        if not found:
            raise UsageError(f"{shown}: no image files in this folder")
        return sorted(found, key=lambda f: f[1])


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _clean(reason: str, path: Path, name: str) -> str:
    """A reason with the server's path of a file replaced by the name the user knows."""
    return reason.replace(str(path), name)


@dataclass(frozen=True)
class Scoring:
    """A job's own scoring: the strategy ``name`` with its options read from ``settings`` (other
    keys are ignored), the ``fusion`` rule, the normal reference images (path, name as the user
    gave it) and the product profile they come from."""

    name: str
    settings: dict
    fusion: str
    references: tuple[tuple[Path, str], ...] = ()
    profile: Profile | None = None

    def strategy(self, runtime, batch_size: int, memory: list | None = None) -> Strategy:
        """The strategy (checked), on ``runtime``; ``memory``: its references' memory, built."""
        references = [p for p, _ in self.references] or None
        return make_strategy(self.name, self.settings, Context(
            runtime, runtime.image_size, references, batch_size, memory), self.fusion)

    def settings_of(self, strategy: Strategy) -> dict:
        """What a profile keeps of it: the strategy's name, fusion and every option."""
        return {"scoring": self.name, "fusion": self.fusion, **asdict(strategy.options)}

    def describe(self) -> dict:
        """What a job's status says of it."""
        profile = self.profile.name if self.profile else None
        return {"scoring": self.name, "fusion": self.fusion, "references": len(self.references),
                "profile": profile}


@dataclass
class Item:
    """One predicted image of a job; ``amap`` [H, W] float32 (inspection jobs only)."""

    index: int  # position in the job's list of images
    group: str
    name: str  # as the user gave it
    stem: str  # unique output name (masks.zip)
    view: Path  # what is rendered: the image itself, or its preview when it is large
    image_score: float
    max_pixel_score: float
    amap: np.ndarray | None

    def summary(self) -> dict:
        return {"index": self.index, "name": self.name, "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}

    def row(self) -> dict:
        """This image's line of scores.csv, as predict.py writes it."""
        return {"path": self.name, "image_score": self.image_score,
                "max_pixel_score": self.max_pixel_score}


@dataclass
class Job:
    """A list of images per group, run by the worker; its uploads live in ``folder``."""

    client: str
    kind: str  # "inspect" or "calibrate"
    inputs: dict[str, list[tuple[Path, str]]]  # group -> (path, name) of each image
    folder: Path
    disk: int  # bytes held in folder
    memory: int  # bytes its maps will hold
    false_alarm_rate: float = 0.0
    tile: int = 0  # tiles of SIDE px; 0: whole images (``Service.submit`` resolves it)
    id: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    state: str = "queued"  # queued, running, finished, cancelled
    done: int = 0
    items: list[Item] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    calibration: dict | None = None
    error: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    over: threading.Event = field(default_factory=threading.Event)  # finished or cancelled
    used: float = field(default_factory=time.monotonic)
    scoring: Scoring | None = None  # None: the server's
    references_memory: int = 0  # bytes of ``memory`` that its reference memory holds while it runs
    save_as: dict | None = None  # a "profile" job: the profile's name, threshold and tile
    profile: dict | None = None  # the profile it used or wrote, as listed

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.inputs.values())

    def run(self, predictor: Predictor, side: int) -> None:
        """Predict every group in order (in the worker thread)."""
        for group, inputs in self.inputs.items():
            if not self._group(predictor, group, inputs, side):
                return
        if self.kind == "calibrate":
            self._calibrate()

    def clean(self, message: str) -> str:
        """``message`` with the server's path of each of its files replaced by the user's name."""
        files = [*itertools.chain(*self.inputs.values()),
                 *(self.scoring.references if self.scoring else ())]
        for path, name in sorted(files, key=lambda f: -len(str(f[0]))):
            message = _clean(message, path, name)
        return message

    def _group(self, predictor: Predictor, group: str, inputs, side: int) -> bool:
        """Predict one group; False when the job was cancelled meanwhile."""
        stems = unique_names([Path(name) for _, name in inputs])
        for result in predictor([p for p, _ in inputs], self.tile):
            if self.cancel.is_set():
                return False
            path, name = inputs[result.index]
            if isinstance(result, Prediction):
                keep = self.kind == "inspect"
                self.items.append(Item(
                    result.index, group, name, stems[result.index],
                    self._view(path, result.index, side) if keep else path, result.image_score,
                    result.max_pixel_score, result.amap if keep else None))
            else:
                self.skipped.append({"name": name, "reason": _clean(result.reason, path, name)})
            self.done += 1
        return not self.cancel.is_set()

    def _view(self, path: Path, index: int, side: int) -> Path:
        """The image, or a preview of it at most ``side`` a side in the job's folder."""
        size = shown_size(path)
        if max(size) <= side:
            return path
        preview = self.folder / "previews" / f"{index}.png"
        preview.parent.mkdir(parents=True, exist_ok=True)
        image = read_rgb(path)
        image = image.reduce(max(size) // side).resize(capped_size(size, side), Image.BILINEAR)
        image.save(preview, compress_level=1)
        self.disk += preview.stat().st_size
        return preview

    def _calibrate(self) -> None:
        scores = {g: [i.max_pixel_score for i in self.items if i.group == g]
                  for g in GROUPS["calibrate"]}
        if not scores["normal"]:
            raise UsageError("none of the normal images could be read")
        self.calibration = calibrate(scores["normal"], self.false_alarm_rate,
                                     scores["defective"]).to_dict()

    def status(self, since: int = 0, skipped_since: int = 0, position: int | None = None) -> dict:
        """Progress and the results from ``since`` on (the page polls for the new ones)."""
        items, skipped = list(self.items), list(self.skipped)  # snapshots: the worker appends
        return {"id": self.id, "kind": self.kind, "state": self.state, "total": self.total,
                "done": self.done, "finished": self.state in ("finished", "cancelled"),
                "position": position, "error": self.error,
                "results": [i.summary() for i in items[since:]], "result_count": len(items),
                "skipped": skipped[skipped_since:], "skipped_count": len(skipped),
                "calibration": self.calibration, "tile": self.tile or None,
                "scoring": self.scoring.describe() if self.scoring else None,
                "profile": self.profile}

    def item(self, index: int) -> Item:
        """The inspected image ``index`` (calibration jobs keep no maps)."""
        if self.kind != "inspect":
            raise UsageError("a calibration job has no heat maps or masks; inspect the images")
        for i in list(self.items):
            if i.index == index:
                return i
        raise NotFound(f"image {index} is not in this job")


class Service:
    """The model (a ``Predictor``), the jobs of every client, the worker thread and the fair
    queue; the one object the page and the HTTP API serve."""

    def __init__(self, predictor: Predictor, limits: Limits = Limits(),
                 folders: list[str | Path] = (), threshold: float = 0.5, description: str = "",
                 profiles: Profiles | None = None, scoring_defaults: dict | None = None):
        """``profiles``: where product profiles are kept (None: none); ``scoring_defaults``: the
        options of every strategy that a job's own scoring takes where it gives none (e.g. the
        server's flags; default: those of the server's own strategy, then each one's)."""
        self.predictor, self.limits, self.profiles = predictor, limits, profiles
        self.scoring_defaults = dict(scoring_defaults or {})
        self.folders = Folders(list(folders), limits)
        self.info = {"model": description, "threshold": threshold,
                     "folders": bool(self.folders.roots), "scoring": predictor.strategy.name,
                     "profiles": profiles is not None, "max_files": limits.files_per_job,
                     "max_request_bytes": limits.request_bytes}
        self.root, self.owner = claim_uploads()
        removed = remove_abandoned_uploads()
        if removed:
            log.warning("removed %d upload folder(s) that killed servers left: %s", len(removed),
                        ", ".join(removed))
        self._model_key: str | None = None
        self.jobs: dict[str, Job] = {}
        self.gone: OrderedDict[str, tuple[str, str]] = OrderedDict()  # id -> (client, why)
        self.queues: dict[str, deque[Job]] = {}  # client -> its waiting jobs
        self.served: dict[str, int] = {}  # client -> tick of its last job started
        self.tick = 0
        self.cond = threading.Condition()
        self.closed = False
        self.renders = threading.BoundedSemaphore(2)  # big renders at a time (memory)
        # every image is checked against the limit before it is decoded; PIL's own check (which
        # refuses at twice its value) must not refuse or warn below it
        Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, limits.pixels_per_image)
        self.worker = threading.Thread(target=self._serve, name="predict", daemon=True)
        self.worker.start()

    # -- jobs --------------------------------------------------------------------------------
    def new_folder(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root))

    def reserve(self, client: str, disk: int) -> None:
        """Refuse early, before a request is read, what cannot fit (``disk``: its size)."""
        with self.cond:
            waiting = len(self.queues.get(client, ()))
            if waiting >= self.limits.jobs_waiting_per_client:
                raise LimitError(f"{waiting} of your jobs are waiting: cancel some or wait for "
                                 "them")
            self._make_room(0, disk)

    def submit(self, client: str, kind: str, inputs: dict[str, list[tuple[Path, str]]],
               folder: Path, false_alarm_rate: float = 0.0, scoring: Scoring | None = None,
               save_as: dict | None = None, tile: int | None = None) -> Job:
        """Queue a job of these inputs (checked: counts, pixels), scored by ``scoring`` (None:
        the server's; ``Service.scoring`` makes it); its ``folder`` is the job's from now on,
        removed with it, and removed at once when the job is refused. ``save_as`` is
        ``save_profile``'s; ``tile`` the job's tiles of SIDE px (``Predictor.tiling_for``;
        None: the profile's where ``scoring`` is one's, else the server's setting; 0: whole
        images)."""
        with removed_on_error(folder):
            if tile is None and scoring and scoring.profile:
                tile = scoring.profile.settings.get("tile")
            tiling = self.predictor.tiling_for(tile)  # a bad SIDE refused
            tile = tiling.side if tiling else 0
            references = list(scoring.references) if scoring and not scoring.profile else []
            total = sum(len(v) for v in inputs.values())
            if total + len(references) > self.limits.files_per_job:
                raise LimitError(f"{total + len(references)} images in one job: this server "
                                 f"takes at most {self.limits.files_per_job}")
            for path, name in itertools.chain(*inputs.values(), references):
                check_pixels(path, name, self.limits.pixels_per_image)
            held = self._references_memory(scoring, inputs, tile)
            maps = sum(self.predictor.map_bytes(p, tile) for p, _ in
                       itertools.chain(*inputs.values())) if kind == "inspect" else 0
            job = Job(client, kind, inputs, folder, _size_of(folder), maps + held,
                      false_alarm_rate, tile, scoring=scoring, references_memory=held,
                      save_as=save_as,
                      profile=scoring.profile.summary() if scoring and scoring.profile else None)
            with self.cond:
                self._make_room(job.memory, job.disk)
                self.jobs[job.id] = job
                self.queues.setdefault(client, deque()).append(job)
                self.cond.notify_all()
            return job

    # -- scoring and profiles -----------------------------------------------------------------
    def scoring(self, references: list[tuple[Path, str]] = (), name: str | None = None,
                fusion: str | None = None, options: dict | None = None,
                profile: str | None = None) -> Scoring | None:
        """A job's own scoring from what a request gives, checked before any model work: the
        strategy ``name`` (default: reference scoring with ``references``, else the server's),
        ``fusion`` and ``options`` (default: the server's), the normal ``references`` (path, name
        as given; default for reference scoring: the server's); or a ``profile``'s. None: the
        server's scoring as it is."""
        options = {k: v for k, v in (options or {}).items() if v is not None}
        given = bool(references) or name is not None or fusion is not None or bool(options)
        if profile is not None:
            if given:
                raise UsageError("a profile brings its own references and scoring: give a "
                                 "profile or those, not both", option="profile")
            return self._profile_scoring(self.profile_store().read(profile))
        if not given:
            return None
        scoring, base = self._scoring(references, name, fusion, options), self.predictor.strategy
        strategy = scoring.strategy(self.predictor.runtime, self.predictor.batch_size)
        server_references = base.context.references if base.context else None
        same_references = [p for p, _ in scoring.references] == (server_references or [])
        return None if same_references and strategy.describe() == base.describe() else scoring

    def _scoring(self, references=(), name: str | None = None, fusion: str | None = None,
                 options: dict | None = None) -> Scoring:
        """``scoring``'s, whether or not it is the server's."""
        base = self.predictor.strategy
        name = name or ("reference" if references else base.name)
        if fusion is not None and fusion not in FUSIONS:
            raise UsageError(f"{str(fusion)[:40]!r}: expected one of {', '.join(FUSIONS)}",
                             option="fusion")
        settings = {**asdict(base.options), **self.scoring_defaults, **(options or {})}
        make_strategy(name, settings, None)  # the name and the options, checked
        needs = STRATEGIES[name].needs_references
        if references and not needs:
            raise UsageError(f"normal reference images are read by reference scoring only, not "
                             f"by {name}", option="scoring")
        server_references = base.context.references if base.context else None
        if needs and not references:
            if not isinstance(server_references, list):
                raise UsageError(f"{name} scoring needs normal reference images: give some",
                                 option="references")
            references = [(p, p.name) for p in server_references]
        scoring = Scoring(name, settings, fusion or base.fusion, tuple(references))
        scoring.strategy(self.predictor.runtime, self.predictor.batch_size)  # checked on it
        return scoring

    def save_profile(self, client: str, name: str, scoring: Scoring | None, folder: Path,
                     threshold: float | None = None, tile: int | None = None) -> Job:
        """Queue a job that builds ``scoring``'s reference memory (None: the server's scoring)
        and saves it with its references, ``threshold`` and ``tile`` as the profile ``name``,
        created or replaced; the job's ``profile`` is then its summary. ``folder`` is the
        job's, as in ``submit``."""
        with removed_on_error(folder):
            check_name(name)
            scoring = scoring or self._scoring(name=self.predictor.strategy.name)
            self.profile_store().check_room(name, len(scoring.references), _size_of(folder)
                                            + self._references_memory(scoring, {}, tile))
        save_as = {"name": name, "threshold": threshold, "tile": tile}
        return self.submit(client, "profile", {}, folder, scoring=scoring, save_as=save_as,
                           tile=tile)

    def profile_store(self) -> Profiles:
        """The product profiles (a server without them refuses)."""
        if self.profiles is None:
            raise UsageError("this server keeps no profiles", option="profile")
        return self.profiles

    def _profile_scoring(self, profile: Profile) -> Scoring:
        s = profile.settings
        return Scoring(s["scoring"], s, s["fusion"], tuple(profile.references), profile)

    def _references_memory(self, scoring: Scoring | None, inputs: dict,
                           tile: int | None = None) -> int:
        """Bytes of the reference memory that ``scoring`` builds for a job of ``inputs`` tiled
        by ``tile`` (its references' tiles counted); too few images for its strategy are
        refused."""
        if scoring is None:
            return 0
        strategy = scoring.strategy(self.predictor.runtime, self.predictor.batch_size)
        sizes = {"the images" if g == "images" else f"the {g} images": len(v)
                 for g, v in inputs.items() if v}
        strategy.check_sizes(sizes, "group")
        paths = [p for p, _ in scoring.references]
        return strategy.memory_bytes(self.predictor.tile_count(paths, tile))

    @property
    def model_key(self) -> str:
        """What the cached reference memories of profiles are keyed by (``model_key``)."""
        if self._model_key is None:
            self._model_key = model_key(self.predictor.runtime)
        return self._model_key

    def memory_key(self, tiling: Tiling | None) -> str:
        """The key of a profile's reference memory built by this model, its references cut by
        ``tiling``."""
        tiled = f"-tile{tiling.side}-overlap{tiling.overlap:g}" if tiling else ""
        return self.model_key + tiled

    def job(self, client: str, job_id: str) -> Job:
        """The client's job ``job_id`` (another client's is not found)."""
        with self.cond:
            job = self.jobs.get(job_id)
            if job is not None and job.client == client:
                job.used = time.monotonic()
                return job
            client_gone, why = self.gone.get(job_id, (None, ""))
        if client_gone == client:
            raise Gone(f"job {job_id} {why}")
        raise NotFound(f"no job {job_id} of yours on this server")

    def status(self, client: str, job_id: str, since: int = 0, skipped_since: int = 0) -> dict:
        job = self.job(client, job_id)
        with self.cond:
            position = self._position(job) if job.state == "queued" else None
        return job.status(since, skipped_since, position)

    def cancel(self, client: str, job_id: str) -> str:
        """Cancel a waiting or running job, or drop a finished one; what happened."""
        job = self.job(client, job_id)
        with self.cond:
            if job.state == "queued":
                self.queues[client].remove(job)
                if not self.queues[client]:
                    del self.queues[client]
                self._over(job, "cancelled")
                return "cancelled"
            if job.state == "running":
                job.cancel.set()
                return "cancelling"
            self._drop(job, "was deleted")
            return "deleted"

    def delete(self, job: Job) -> None:
        """Drop a job at once (the synchronous API's, once answered)."""
        with self.cond:
            if job.id in self.jobs:
                del self.jobs[job.id]
                shutil.rmtree(job.folder, ignore_errors=True)

    def close(self) -> None:
        """Stop the worker (a running job stops at its next image) and remove every upload."""
        with self.cond:
            self.closed = True
            for job in self.jobs.values():
                job.cancel.set()
                job.over.set()
            self.cond.notify_all()
        self.worker.join(timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
        os.close(self.owner)

    # -- what a job shows ---------------------------------------------------------------------
    def picture(self, client: str, job_id: str, index: int, what: str,
                threshold: float | None = None, side: int | None = None) -> np.ndarray:
        """An image of a job: ``image``, ``overlay`` (the heat map over it) or ``mask``
        (map > threshold, 0/255), at most ``side`` (and the output limit) a side."""
        item = self.job(client, job_id).item(index)
        side = min(side or math.inf, self.limits.output_side)
        with self.renders:
            try:
                return draw(item, what, threshold, side)
            except OSError:  # the job was dropped meanwhile: its files are gone
                raise Gone(f"job {job_id} has expired while its image was drawn") from None

    def render(self, client: str, job_id: str, index: int, what: str,
               threshold: float | None = None, side: int | None = None) -> bytes:
        """``picture`` as PNG."""
        return png_bytes(self.picture(client, job_id, index, what, threshold, side))

    def map_data(self, client: str, job_id: str, index: int, side: int = 128) -> dict:
        """The map of an image at most ``side`` a side, float32 little-endian, for the page to
        draw contours at any T without asking again."""
        item = self.job(client, job_id).item(index)
        h, w = item.amap.shape
        amap = item.amap if max(h, w) <= side else full_size(item.amap, capped_size((w, h), side))
        return {"width": amap.shape[1], "height": amap.shape[0],
                "data": np.ascontiguousarray(amap, dtype="<f4").tobytes()}

    # -- the queue ----------------------------------------------------------------------------
    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.queues:
                    self.cond.wait()
                if self.closed:
                    return
                job = self._next()
                job.state = "running"
            self._run(job)
            with self.cond:
                job.memory -= job.references_memory  # dropped with the job's predictor
                job.references_memory = 0
                self._over(job, "cancelled" if job.cancel.is_set() else "finished")

    def _run(self, job: Job) -> None:
        """Run a job with its scoring (in the worker thread); never raises."""
        try:
            predictor = self._predictor(job)
            if job.kind == "profile":
                job.profile = self._save(job, predictor.strategy)
            else:
                job.run(predictor, self.limits.output_side)
        except InputError as e:
            job.error = job.clean(str(e))
        except Exception as e:  # reported without internals; the server keeps serving
            log.error("job failed: %s", type(e).__name__)
            job.error = f"the model failed on this job ({type(e).__name__})"

    def _predictor(self, job: Job) -> Predictor:
        """The server's predictor, or one of the job's own scoring: its reference memory built
        (and cached in its profile) or read from its profile's cache."""
        scoring, default = job.scoring, self.predictor
        if scoring is None:
            return default
        profile, runtime = scoring.profile, default.runtime
        tiling, cached = default.tiling_for(job.tile), None
        if profile is not None and scoring.references:
            cached = self.profiles.memory(profile, self.memory_key(tiling), runtime.device)
        predictor = Predictor(runtime, scoring.strategy(runtime, default.batch_size, cached),
                              default.batch_size, default.num_workers, tiling,
                              default.max_map_side)
        # cached: the memory of the profile's own tiling (a job's own tile does not replace it)
        own = profile is not None and default.tiling_for(profile.settings.get("tile")) == tiling
        if own and cached is None and predictor.strategy.memory is not None:
            self.profiles.keep_memory(profile, self.memory_key(tiling), predictor.strategy.memory)
        return predictor

    def _save(self, job: Job, strategy: Strategy) -> dict | None:
        """A "profile" job's profile, written with the memory its predictor built (None: the
        job was cancelled first)."""
        if job.cancel.is_set():
            return None
        memory = strategy.memory
        settings = {**job.scoring.settings_of(strategy), "threshold": job.save_as["threshold"],
                    "tile": job.save_as["tile"]}
        key = self.memory_key(self.predictor.tiling_for(job.tile))
        return self.profiles.save(job.save_as["name"], list(job.scoring.references), settings,
                                  memory, key if memory is not None else None)

    def _order(self) -> list[Job]:
        """The waiting jobs in the order they will run: each time, the oldest job of the client
        served longest ago (never served: first)."""
        queues = {c: deque(q) for c, q in self.queues.items()}
        served = {c: self.served.get(c, 0) for c in queues}
        order = []
        for tick in itertools.count(self.tick + 1):
            if not queues:
                return order
            client = min(queues, key=served.__getitem__)
            order.append(queues[client].popleft())
            served[client] = tick
            if not queues[client]:
                del queues[client]

    def _next(self) -> Job:
        """The first job of ``_order`` (round robin across clients), off its queue."""
        job = self._order()[0]
        queue = self.queues[job.client]
        queue.popleft()
        if not queue:
            del self.queues[job.client]
        self.tick += 1
        self.served[job.client] = self.tick
        if len(self.served) > 10_000:  # forget clients with nothing waiting
            self.served = {c: t for c, t in self.served.items() if c in self.queues}
        return job

    def _position(self, job: Job) -> int:
        """How many waiting jobs run before this one."""
        return self._order().index(job)

    def _over(self, job: Job, state: str) -> None:
        job.state = state
        if state == "cancelled":
            job.items, job.memory = [], 0
            shutil.rmtree(job.folder, ignore_errors=True)
            job.disk = 0
        job.over.set()

    def _drop(self, job: Job, why: str) -> None:
        del self.jobs[job.id]
        shutil.rmtree(job.folder, ignore_errors=True)
        self.gone[job.id] = (job.client, why)
        while len(self.gone) > 100_000:  # ids only: a few MB at most
            self.gone.popitem(last=False)

    def _held(self, jobs) -> tuple[int, int]:
        jobs = list(jobs)
        return sum(j.memory for j in jobs), sum(j.disk for j in jobs)

    def _make_room(self, memory: int, disk: int) -> None:
        """Drop finished jobs until ``memory`` and ``disk`` more fit: the least recently used
        job of the client holding the most first; refuse, dropping nothing, what cannot fit
        beside the jobs waiting and running."""
        limits = self.limits
        busy = self._held(j for j in self.jobs.values() if j.state in ("queued", "running"))
        if busy[0] + memory > limits.memory_bytes or busy[1] + disk > limits.disk_bytes:
            raise LimitError(
                f"the server is full: this request needs {memory / MiB:.1f} MiB of maps and "
                f"{disk / MiB:.1f} MiB of uploads beside the {busy[0] / MiB:.1f} and "
                f"{busy[1] / MiB:.1f} MiB that waiting and running jobs hold (limits "
                f"{limits.memory_bytes / MiB:.0f} and {limits.disk_bytes / MiB:.0f} MiB): try "
                "again when jobs finish, or send fewer images")
        while True:
            held = self._held(self.jobs.values())
            if held[0] + memory <= limits.memory_bytes and held[1] + disk <= limits.disk_bytes:
                return
            share: dict[str, int] = {}
            for j in self.jobs.values():
                share[j.client] = share.get(j.client, 0) + j.memory + j.disk
            done = [j for j in self.jobs.values() if j.state in ("finished", "cancelled")]
            self._drop(min(done, key=lambda j: (-share[j.client], j.used)),
                       "has expired: the server keeps finished jobs while its memory and disk "
                       "allow; run it again")


def claim_uploads() -> tuple[Path, int]:
    """A new upload folder in the system's temporary folder and the descriptor of its owner
    file, locked for as long as this process holds it open (the lock dies with the process)."""
    root = Path(tempfile.mkdtemp(prefix=UPLOADS))
    owner = os.open(root / OWNER, os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(owner, fcntl.LOCK_EX)
    return root, owner


def remove_abandoned_uploads() -> list[str]:
    """Remove the upload folders whose owner file no server holds locked (their server was
    killed); their names. A folder without an owner file (being made) is left alone."""
    removed = []
    for root in Path(tempfile.gettempdir()).glob(UPLOADS + "*"):
        try:
            owner = os.open(root / OWNER, os.O_RDWR)
        except OSError:  # no owner file, or another user's
            continue
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(root, ignore_errors=True)
            removed.append(root.name)
        except OSError:  # a live server's
            pass
        finally:
            os.close(owner)
    return removed


@contextmanager
def removed_on_error(folder: Path):
    """Remove ``folder`` when the block fails: a refused request leaves nothing behind."""
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def draw(item: Item, what: str, threshold: float | None, side: float) -> np.ndarray:
    """The image, its overlay or its mask at the view's size capped to ``side``."""
    size = capped_size(shown_size(item.view), side)
    if what == "mask":
        return binary_mask(full_size(item.amap, size), threshold)
    image = read_rgb(item.view)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    if what == "image":
        return np.asarray(image)
    return overlay(np.asarray(image), full_size(item.amap, size))
