"""The inspection service (utils/serving/service.py) with a stand-in model: the fair queue, cancellation,
retention by memory and disk, refusals; and the table of hostile requests against a running
``app.py`` (tiny model), each with its status, no traceback or internal path in the answer or
the log, nothing written outside the server's folders, and ``GET /`` still answering at once."""
from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from helpers.http_client import Client
from utils.errors import UsageError
from utils.inference.prediction import Prediction
from utils.serving.service import Gone, LimitError, Limits, NotFound, Service

ROOT = Path(__file__).resolve().parents[1]


class Gated:
    """A stand-in predictor: each image waits for ``gate``; records the order of the images."""

    runtime = SimpleNamespace(image_size=8)
    strategy = SimpleNamespace(name="zero_shot")

    def __init__(self):
        self.gate, self.seen = threading.Event(), []
        self.gate.set()

    def tiling_for(self, tile):  # whole images
        return None

    def map_bytes(self, path, tile=None):  # its maps: 8 x 8 float32
        return 4 * 8 * 8

    def __call__(self, paths, tile=None):
        for i, p in enumerate(paths):
            assert self.gate.wait(10)
            self.seen.append(p.parent.parent.name)  # the job's folder
            yield Prediction(i, p, np.full((8, 8), 0.1 * (i + 1), np.float32), 0.5)


def png(path: Path, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(path)
    return path


def submit(service: Service, client: str, n: int = 1):
    folder = service.new_folder()
    paths = [(png(folder / "images" / f"{k}.png"), f"{k}.png") for k in range(n)]
    return service.submit(client, "inspect", {"images": paths}, folder)


def wait_over(job, timeout=10):
    assert job.over.wait(timeout), job.state


def test_round_robin_across_clients_and_queue_positions():
    model = Gated()
    service = Service(model)
    try:
        model.gate.clear()
        a = [submit(service, "a") for _ in range(4)]
        while a[0].state != "running":
            time.sleep(0.01)
        b = submit(service, "b")
        c = [submit(service, "c") for _ in range(2)]
        # a has been served; b and c not yet: b, c, a, c, a, a
        positions = {j.id: service.status(j.client, j.id)["position"] for j in (b, *c, *a[1:])}
        assert [positions[j.id] for j in (b, c[0], a[1], c[1], a[2], a[3])] == list(range(6))
        model.gate.set()
        for j in (*a, b, *c):
            wait_over(j)
        order = [j.folder.name for j in (a[0], b, c[0], a[1], c[1], a[2], a[3])]
        assert model.seen == order
    finally:
        service.close()
    assert not service.root.exists()


def test_cancel_waiting_running_and_finished_jobs():
    model = Gated()
    service = Service(model)
    try:
        model.gate.clear()
        running = submit(service, "a", n=3)
        waiting = submit(service, "a")
        while running.state != "running":
            time.sleep(0.01)
        assert service.cancel("a", waiting.id) == "cancelled"
        assert service.cancel("a", running.id) == "cancelling"
        model.gate.set()
        wait_over(running)
        assert running.state == waiting.state == "cancelled"
        assert not running.folder.exists() and not waiting.folder.exists()
        assert running.folder.name not in model.seen[1:] and waiting.folder.name not in model.seen
        done = submit(service, "a")
        wait_over(done)
        with pytest.raises(NotFound):
            service.cancel("b", done.id)  # not b's job
        assert service.cancel("a", done.id) == "deleted"
        with pytest.raises(Gone, match="was deleted"):
            service.status("a", done.id)
    finally:
        service.close()


def test_retention_by_memory_drops_the_biggest_holder_first_and_says_so():
    # maps of 8x8 float32: 256 bytes an image; room for 6 images
    service = Service(Gated(), Limits(memory_bytes=6 * 256))
    try:
        big = [submit(service, "big", n=2) for _ in range(2)]
        small = submit(service, "small", n=1)
        for j in (*big, small):
            wait_over(j)
        newer = submit(service, "big", n=2)  # 7 images: one of big's is dropped, the oldest
        wait_over(newer)
        with pytest.raises(Gone, match="has expired"):
            service.status("big", big[0].id)
        assert service.status("small", small.id)["state"] == "finished"
        assert not big[0].folder.exists()
        with pytest.raises(LimitError, match="server is full"):
            submit(service, "x", n=7)  # can never fit: refused, and nothing is dropped for it
        assert service.status("small", small.id)["state"] == "finished"
    finally:
        service.close()


def test_limits_refuse_before_any_model_work(tmp_path):
    service = Service(Gated(), Limits(files_per_job=2, pixels_per_image=100))
    try:
        with pytest.raises(LimitError, match="at most 2"):
            submit(service, "a", n=3)
        with pytest.raises(LimitError, match="too large .12x10."):
            submit(service, "a", n=1)
        assert [p.name for p in service.root.iterdir()] == [".owner"]  # refused jobs: no folder
    finally:
        service.close()


# ---- hostile requests against a running server -----------------------------------------------
def bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (a few bytes of data): a decompression bomb."""
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_archive, tiny_checkpoint):
    """A running ``app.py`` with a token, one shared folder and small limits; its temporary
    folder, log and the sandbox around it."""
    box = tmp_path_factory.mktemp("sandbox")
    shared, outside, tmp = box / "shared", box / "outside", box / "server_tmp"
    for d in (shared / "good", shared / "fifo", shared / "links", outside, tmp):
        d.mkdir(parents=True)
    png(shared / "good" / "a.png")
    png(shared / "fifo" / "b.png")
    os.mkfifo(shared / "fifo" / "stuck.png")
    png(outside / "secret.png")
    (shared / "escape").symlink_to(outside)
    (shared / "links" / "out.png").symlink_to(outside / "secret.png")
    log = open(box / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--checkpoint_path", str(tiny_checkpoint),
         "--pretrained_path", str(tiny_archive), "--device", "cpu", "--port", "0",
         "--token", "s3cret-token", "--allow_folder", str(shared), "--max_request_mb", "1",
         "--max_files", "4", "--max_pixels", "20000000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
        env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
    line = server.stdout.readline()
    url = re.search(r"http://[^ /]+:\d+", line).group(0)
    yield SimpleNamespace(url=url, box=box, shared=shared, outside=outside, tmp=tmp, log=log,
                          process=server, model_files=(tiny_checkpoint, tiny_archive))
    server.terminate()
    assert server.wait(10) == -15  # SIGTERM: a stop (uvicorn re-raises the signal) ...
    assert list(tmp.iterdir()) == []  # ... that removes its temporary files


def files_outside(h) -> set[Path]:
    return {p for p in h.box.rglob("*") if h.tmp not in p.parents and p != h.tmp
            and p.name != "server.log"}


def answers_at_once(h):
    start = time.monotonic()
    assert Client(h.url, "s3cret-token").request("/")[0] == 200
    assert time.monotonic() - start < 1.0


def finished_job(client, form) -> dict:
    return client.run_job(form, timeout=60)


def test_hostile_requests(hostile, tmp_path):
    h = hostile
    me, other = Client(h.url, "s3cret-token"), Client(h.url, "s3cret-token")
    good = png(tmp_path / "good.png")
    job = finished_job(me, [("kind", "inspect"), ("images", good)])["id"]
    cal = finished_job(me, [("kind", "calibrate"), ("normal", good)])["id"]
    bomb = bomb_png(tmp_path / "bomb.png", 100_000, 100_000)
    huge = bomb_png(tmp_path / "huge.png", 13_000, 13_000)
    inspect = lambda *fields: [("kind", "inspect"), *fields]
    no_token, wrong_token = Client(h.url), Client(h.url, "wrong")
    rows = [  # (what, client, path, request keywords, status)
        ("traversal", me, "/api/jobs", dict(form=inspect(("images_folder", "../../etc"))), 400),
        ("absolute path", me, "/api/jobs", dict(form=inspect(("images_folder", "/etc"))), 400),
        ("glob", me, "/api/jobs", dict(form=inspect(("images_folder", "/usr/**/*.nomatch"))),
         400),
        ("glob in the shared folder", me, "/api/jobs",
         dict(form=inspect(("images_folder", f"{h.shared}/*"))), 400),
        ("symlinked folder leading out", me, "/api/jobs",
         dict(form=inspect(("images_folder", "escape"))), 400),
        ("symlinked file leading out", me, "/api/jobs",
         dict(form=inspect(("images_folder", "links"))), 400),
        ("decompression bomb", me, "/api/jobs", dict(form=inspect(("images", bomb))), 413),
        ("13000x13000 over the limit", me, "/api/jobs", dict(form=inspect(("images", huge))),
         413),
        ("oversized upload", me, "/api/jobs",
         dict(form=inspect(("images", ("big.png", b"x" * (2 * 2**20))))), 413),
        ("too many files", me, "/api/jobs", dict(form=inspect(*[("images", good)] * 5)), 413),
        ("more files than the form parser takes", me, "/api/jobs",
         dict(form=inspect(*[("images", good)] * 17)), 413),
        ("name over 255 bytes", me, "/api/jobs",
         dict(form=inspect(("images", ("a" * 300 + ".png", good.read_bytes())))), 400),
        ("NUL in a name", me, "/api/jobs",
         dict(form=inspect(("images", (b"a\x00b.png", good.read_bytes())))), 400),
        ("NUL in a folder", me, "/api/jobs", dict(form=inspect(("images_folder", "go\x00od"))),
         400),
        ("wrong Host", me, "/", dict(headers={"Host": "evil.example"}), 403),
        ("cross-site post", me, "/api/jobs",
         dict(form=inspect(("images", good)), headers={"Origin": "http://evil.example"}), 403),
        ("no token", no_token, "/", {}, 401),
        ("wrong token", wrong_token, "/api/info", {}, 401),
        ("another client's job", other, f"/api/jobs/{job}", {}, 404),
        ("another client's overlay", other, f"/api/jobs/{job}/overlay/0.png", {}, 404),
        ("another client's delete", other, f"/api/jobs/{job}", dict(method="DELETE"), 404),
        ("a guessed job id", me, "/api/jobs/1", {}, 404),
        ("threshold nan", me, f"/api/jobs/{job}/mask/0.png?threshold=nan", {}, 422),
        ("threshold inf", me, f"/api/jobs/{job}/masks.zip?threshold=inf", {}, 422),
        ("API threshold nan", me, "/api/v1/predict",
         dict(form=[("images", good), ("threshold", "nan")]), 422),
        ("false-alarm rate nan", me, "/api/jobs",
         dict(form=[("kind", "calibrate"), ("normal", good), ("false_alarm_rate", "nan")]), 422),
        ("calibrate job's masks.zip", me, f"/api/jobs/{cal}/masks.zip?threshold=0.5", {}, 400),
        ("calibrate job's overlay", me, f"/api/jobs/{cal}/overlay/0.png", {}, 400),
        ("a picture that is not one", me, f"/api/jobs/{job}/passwd/0.png", {}, 404),
        ("DELETE a finished job", me, f"/api/jobs/{job}", dict(method="DELETE"), 200),
        ("the deleted job", me, f"/api/jobs/{job}", {}, 410),
        ("the page", me, "/", {}, 200),
        ("the model's description", me, "/api/info", {}, 200),
        ("the API's document", me, "/api/v1/openapi.json", {}, 200),
        ("the API's docs page", me, "/api/v1/docs", {}, 200),
    ]
    assert len(rows) >= 20
    before = files_outside(h)
    internal = [str(h.tmp), str(ROOT), str(h.outside), "Traceback", 'File "',
                *(str(f.parent) for f in h.model_files)]
    checkpoint = h.model_files[0].name  # the page names the model by its file name only
    assert me.json("/api/info")[1]["model"] == f"checkpoint {checkpoint}, zero-shot"
    for what, client, path, kwargs, expected in rows:
        status, body = client.request(path, **kwargs)
        assert status == expected, (what, status, body[:300])
        text = body.decode(errors="replace")
        assert not any(s in text for s in internal), (what, text[:300])
        if status >= 400 and path.startswith("/api"):
            assert '"error"' in text, what
        assert files_outside(h) == before, what
        answers_at_once(h)

    # a path in the name is dropped; a FIFO among the images is left out, not waited for
    named = finished_job(me, inspect(("images", ("../../evil.png", good.read_bytes()))))
    assert [r["name"] for r in named["results"]] == ["evil.png"]
    fifo = finished_job(me, inspect(("images_folder", "fifo")))
    assert [r["name"] for r in fifo["results"]] == ["fifo/b.png"]
    assert files_outside(h) == before
    h.log.flush()
    log = Path(h.log.name).read_text()
    assert not any(s in log for s in internal), log[-2000:]


def test_policy_beyond_loopback():
    """Beyond loopback a token is made (and printed) and the bound address is an allowed host;
    on loopback there is none unless --token gives one."""
    import app
    flags = ["--checkpoint_path", "x.pth"]
    wide = app.access_of(app.parse_args([*flags, "--host", "0.0.0.0"]))
    assert wide.token and len(wide.token) >= 24 and wide.hosts == []
    assert not wide.token_ok(None) and not wide.token_ok("guess") and wide.token_ok(wide.token)
    lan = app.access_of(app.parse_args([*flags, "--host", "10.1.2.3", "--allowed_host", "cam"]))
    assert lan.hosts == ["cam", "10.1.2.3"] and lan.host_allowed("CAM:7860")
    assert not lan.host_allowed("evil.example:7860") and lan.host_allowed("[::1]:80")
    local = app.access_of(app.parse_args(flags))
    assert local.token is None and local.token_ok(None)
    assert app.access_of(app.parse_args([*flags, "--token", "t"])).token == "t"
    with pytest.raises(UsageError, match="not a folder"):
        Service(Gated(), folders=["/nonexistent/folder"])
