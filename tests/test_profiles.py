"""Per-job scoring and product profiles: in the service (utils/serving/service.py,
utils/serving/profiles.py) a profile's and a job's own references score as ``predict.py
--reference`` does, the cached memory is read after a restart (not built again), a kill at any
line of a profile's write leaves the old or the new profile after the next start, hostile names
and limits are refused, a corrupt reference is named, and the upload folder of a killed server is
removed at the next start; over HTTP, against a running ``app.py``, the same: a profile made with
``PUT /api/v1/profiles/NAME`` answers ``POST /api/v1/predict?profile=NAME`` as ``predict.py
--reference`` and at its T, after a SIGTERM and a new start too; a SIGKILL while a profile is
replaced; hostile requests refused with their status and one line."""
from __future__ import annotations

import contextlib
import copy
import csv
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from helpers.http_client import Client
from helpers.served import Served
from utils.cli import predictor_of
from utils.errors import UsageError
from utils.inference.prediction import Predictor
from utils.inference.runtime import TorchRuntime
from utils.inference.tiling import Tiling, tiles_of
from utils.scoring import Context, make_strategy, reference
from utils.serving import profiles as profiles_module
from utils.serving.profiles import ProfileLimits, Profiles, check_name, model_key
from utils.serving.service import (LimitError, Limits, NotFound, Service, claim_uploads,
                                   remove_abandoned_uploads)

ROOT = Path(__file__).resolve().parents[1]


def photo(path: Path, seed: int, size=(50, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """good/ (4 normal references), line/ (5 images to inspect) and wide/ (3 images larger than
    the tiny model's 56 px input: 8 tiles of 48 px each)."""
    root = tmp_path_factory.mktemp("photos")
    for k in range(4):
        photo(root / "good" / f"g{k}.png", 10 + k)
    for k in range(5):
        photo(root / "line" / f"i{k}.png", 20 + k)
    for k in range(3):
        photo(root / "wide" / f"w{k}.png", 30 + k, (130, 70))
    return root


@pytest.fixture(scope="module")
def model_flags(tiny_archive, tiny_checkpoint):
    return ["--checkpoint_path", str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
            "--device", "cpu", "--num_workers", "0"]


@pytest.fixture(scope="module")
def predictor(model_flags):
    """The tiny model, zero-shot: the server's default scoring."""
    return predictor_of(predict.parse_args(model_flags))


@pytest.fixture(scope="module")
def predicted(photos, model_flags, tmp_path_factory):
    """``predict.py line/`` with ``--reference good/`` (and ``--coreset 0.5``) and with
    ``--mutual``: name -> max pixel score."""
    def run(*flags):
        out = tmp_path_factory.mktemp("out")
        assert predict.main([str(photos / "line"), "--save_path", str(out), *flags,
                             *model_flags]) == 0
        with open(out / "scores.csv") as f:
            return {Path(r["path"]).name: float(r["max_pixel_score"]) for r in csv.DictReader(f)}
    return {"reference": run("--reference", str(photos / "good")),
            "coreset": run("--reference", str(photos / "good"), "--coreset", "0.5"),
            "mutual": run("--mutual")}


TILE = 48  # px: 8 tiles of each wide/ image, 2 of each reference


@pytest.fixture(scope="module")
def predicted_tiled(photos, model_flags, tmp_path_factory):
    """``predict.py wide/ --tile 48``, zero-shot and with ``--reference good/``: name -> max
    pixel score."""
    def run(*flags):
        out = tmp_path_factory.mktemp("out")
        assert predict.main([str(photos / "wide"), "--save_path", str(out), "--tile", str(TILE),
                             *flags, *model_flags]) == 0
        with open(out / "scores.csv") as f:
            return {Path(r["path"]).name: float(r["max_pixel_score"]) for r in csv.DictReader(f)}
    return {"zero_shot": run(), "reference": run("--reference", str(photos / "good"))}


def uploaded(service: Service, sources: dict[str, list[Path]]):
    """A job folder with copies of ``sources`` (group -> files) as the web side stores uploads;
    the folder and group -> [(path, name as given)]."""
    folder, inputs = service.new_folder(), {}
    for group, files in sources.items():
        (folder / group).mkdir()
        inputs[group] = [(Path(shutil.copy(f, folder / group / f"{k:05d}.png")), f.name)
                         for k, f in enumerate(files)]
    return folder, inputs


def finished(job, timeout=60):
    assert job.over.wait(timeout), job.state
    assert job.error is None, job.error
    return job


def inspect(service: Service, photos: Path, scoring) -> dict[str, float]:
    folder, inputs = uploaded(service, {"images": sorted((photos / "line").iterdir())})
    job = finished(service.submit("a", "inspect", inputs, folder, scoring=scoring))
    return {i.name: i.max_pixel_score for i in job.items}


def save(service: Service, name: str, references: list[Path], **settings):
    folder, inputs = uploaded(service, {"references": references})
    scoring = service.scoring(inputs["references"], options={"coreset": settings.pop("coreset",
                                                                                    None)})
    return service.save_profile("a", name, scoring, folder, **settings)


def test_profile_and_job_references_score_as_predict_reference(photos, predictor, predicted,
                                                                tmp_path, monkeypatch):
    store = tmp_path / "profiles"
    service = Service(predictor, profiles=Profiles(store))
    try:
        zero_shot = inspect(service, photos, None)
        references = sorted((photos / "good").iterdir())
        folder, inputs = uploaded(service, {"references": references})
        own = service.scoring(inputs["references"])
        assert inspect(service, photos, own) == pytest.approx(predicted["reference"], abs=1e-4)
        assert inspect(service, photos, service.scoring(name="mutual")) == pytest.approx(
            predicted["mutual"], abs=1e-4)

        job = finished(save(service, "bracket-7", references, threshold=0.3))
        assert job.profile["name"] == "bracket-7" and job.profile["references"] == 4
        assert job.profile["threshold"] == 0.3 and job.profile["scoring"] == "reference"
        assert service.profiles.list() == [job.profile]
        used = service.scoring(profile="bracket-7")
        scores = inspect(service, photos, used)
        assert scores == pytest.approx(predicted["reference"], abs=1e-4)
        assert scores != pytest.approx(zero_shot, abs=1e-4)
        finished(save(service, "half", references, coreset=0.5))
        assert inspect(service, photos, service.scoring(profile="half")) == pytest.approx(
            predicted["coreset"], abs=1e-4)
    finally:
        service.close()

    # a restart: the memory is read from the profile's cache, never built again
    built = []
    monkeypatch.setattr(reference, "memory_of", lambda *a, **k: built.append(1) or 1 / 0)
    service = Service(predictor, profiles=Profiles(store))
    try:
        job_scores = inspect(service, photos, service.scoring(profile="bracket-7"))
        assert job_scores == scores and built == []
        # another model's cache is not used: built once, and kept in its place
        monkeypatch.undo()
        calls = []
        monkeypatch.setattr(reference, "memory_of", lambda *a, **k: calls.append(1) or real(
            *a, **k))
        service._model_key = "another-model"
        assert inspect(service, photos, service.scoring(profile="bracket-7")) == scores
        inspect(service, photos, service.scoring(profile="bracket-7"))
        assert calls == [1]
        assert [p.name for p in (store / "bracket-7").glob("memory-*")] == [
            "memory-another-model.safetensors"]
    finally:
        service.close()


real = reference.memory_of


def test_the_reference_memory_counts_against_the_memory_limit(photos, predictor, tmp_path):
    references = sorted((photos / "good").iterdir())
    runtime = predictor.runtime
    built = reference.memory_of(references, runtime, runtime.image_size, coreset=0.5)
    assert sum(t.numel() * t.element_size() for t in built) == reference.memory_bytes(
        runtime, 4, 0.5)
    # room for the maps of 5 images and 2 references' memory, not 4
    maps = 5 * 4 * runtime.image_size ** 2
    service = Service(predictor, Limits(memory_bytes=maps + reference.memory_bytes(runtime, 2)))
    try:
        folder, inputs = uploaded(service, {"images": sorted((photos / "line").iterdir()),
                                            "references": references})
        with pytest.raises(LimitError, match="server is full"):
            service.submit("a", "inspect", {"images": inputs["images"]}, folder,
                           scoring=service.scoring(inputs["references"]))
        assert not folder.exists()
        folder, inputs = uploaded(service, {"images": sorted((photos / "line").iterdir()),
                                            "references": references[:2]})
        job = finished(service.submit("a", "inspect", {"images": inputs["images"]}, folder,
                                      scoring=service.scoring(inputs["references"])))
        assert job.memory == maps  # the memory is dropped once the job has run
    finally:
        service.close()


def test_a_tiled_profile_counts_its_reference_tiles_and_caches_its_tiled_memory(
        photos, predictor, predicted_tiled, tmp_path, monkeypatch):
    references = sorted((photos / "good").iterdir())
    runtime, tiling = predictor.runtime, Tiling(TILE)
    tiles = sum(tiles_of(p, tiling) for p in references)
    assert tiles == 2 * len(references)
    built = reference.memory_of(references, runtime, runtime.image_size, tiling=tiling)
    assert sum(t.numel() * t.element_size() for t in built) == reference.memory_bytes(
        runtime, tiles)

    store = tmp_path / "profiles"
    service = Service(predictor, profiles=Profiles(store))
    try:
        job = save(service, "tiled", references, tile=TILE)
        assert job.references_memory == reference.memory_bytes(runtime, tiles)
        assert finished(job).profile["tile"] == TILE
        assert [p.name for p in (store / "tiled").glob("memory-*")] == [
            f"memory-{service.model_key}-tile{TILE}-overlap0.25.safetensors"]
    finally:
        service.close()

    # a restart: the tiled memory is read from the cache, and the profile's jobs are tiled
    monkeypatch.setattr(reference, "memory_of", lambda *a, **k: 1 / 0)
    service = Service(predictor, profiles=Profiles(store))
    try:
        folder, inputs = uploaded(service, {"images": sorted((photos / "wide").iterdir())})
        job = finished(service.submit("a", "inspect", inputs, folder,
                                      scoring=service.scoring(profile="tiled")))
        assert job.status()["tile"] == TILE
        assert {i.name: i.max_pixel_score for i in job.items} == pytest.approx(
            predicted_tiled["reference"], abs=1e-4)
    finally:
        service.close()


def test_bad_scoring_and_corrupt_references_are_named(photos, predictor, tmp_path):
    service = Service(predictor, profiles=Profiles(tmp_path / "profiles"))
    try:
        bad = tmp_path / "bad.png"
        bad.write_bytes(b"not an image")
        references = [*sorted((photos / "good").iterdir())[:2], bad]
        folder, inputs = uploaded(service, {"images": [photos / "line" / "i0.png"],
                                            "references": references})
        job = service.submit("a", "inspect", {"images": inputs["images"]}, folder,
                             scoring=service.scoring(inputs["references"]))
        assert job.over.wait(60)
        assert job.error.startswith("reference image bad.png: cannot read it (")
        assert str(service.root) not in job.error and "/tmp" not in job.error
        job = save(service, "p", references)
        assert job.over.wait(60) and "reference image bad.png" in job.error
        assert service.profiles.list() == [] and os.listdir(tmp_path / "profiles") == [".lock"]
        refs = inputs["references"]
        for call, option, words in [
                (lambda: service.scoring(name="reference"), "references", "needs normal"),
                (lambda: service.scoring(refs, name="mutual"), "scoring", "reference scoring"),
                (lambda: service.scoring(name="best"), "scoring", "expected one of"),
                (lambda: service.scoring(refs, fusion="max"), "fusion", "expected one of"),
                (lambda: service.scoring(refs, options={"coreset": 2.0}), "coreset", "(0, 1]"),
                (lambda: service.scoring(refs, profile="p"), "profile", "not both"),
                (lambda: service.scoring(profile="../p"), "profile", "letters, digits")]:
            with pytest.raises(UsageError, match=re.escape(words)) as e:
                call()
            assert e.value.option == option
        with pytest.raises(NotFound, match="no profile 'absent'"):
            service.scoring(profile="absent")
        folder, inputs = uploaded(service, {"images": [photos / "line" / "i0.png"]})
        with pytest.raises(UsageError, match="at least 5 images"):
            service.submit("a", "inspect", inputs, folder, scoring=service.scoring(name="mutual"))
    finally:
        service.close()


@pytest.mark.parametrize("name", ["", "a" * 65, "../etc", "a/b", ".hidden", "a b", "caf\u00e9",
                                  "x\n", "name.json", "\u0661", None])
def test_hostile_profile_names_are_refused(name):
    with pytest.raises(UsageError, match="expected 1 to 64 letters, digits, '-' or '_'"):
        check_name(name)


def test_profile_limits_are_named(tmp_path):
    files = [photo(tmp_path / f"r{k}.png", k) for k in range(3)]
    size = sum(f.stat().st_size for f in files[:2])
    store = Profiles(tmp_path / "p", ProfileLimits(profiles=2, references=2,
                                                   disk_bytes=2 * size + 10))
    refs = [(f, f.name) for f in files]
    with pytest.raises(LimitError, match="at most 2 .the references-per-profile limit"):
        store.save("a", refs, {})
    store.save("a", refs[:2], {})
    store.save("a", refs[:2], {"threshold": 1.0})  # a replacement is not one more
    with pytest.raises(LimitError, match="profiles' disk limit"):
        store.save("b", refs[1:], {})
    store.save("b", refs[:1], {})
    with pytest.raises(LimitError, match="at most 2 profiles .the profiles limit"):
        store.check_room("c", 1, 0)
    store.delete("a")
    store.check_room("c", 1, 0)
    assert [p["name"] for p in store.list()] == ["b"]
    with pytest.raises(NotFound):
        store.delete("a")


def snapshot(folder: Path) -> list[tuple[str, int]]:
    """Every entry under ``folder`` with its size (folders: -1)."""
    return sorted((str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1)
                  for p in folder.rglob("*"))


def replace_in_child(folder: Path, refs, settings, memory, kill_at: int | None = None):
    """In a forked child, replace the profile ``p``, counting the lines of profiles.py executed;
    at line ``kill_at`` exit at once, as SIGKILL does (nothing cleaned). The child's exit status
    (0: it finished) and the lines at which the folder first showed each new state."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        count, changes, last = 0, [1], snapshot(folder)

        def trace(frame, event, arg):
            nonlocal count, last
            if frame.f_code.co_filename != profiles_module.__file__:
                return None
            if event == "line":
                count += 1
                if count == kill_at:
                    os._exit(9)
                now = snapshot(folder)
                if now != last:
                    changes.append(count)
                    last = now
            return trace
        store = Profiles(folder)
        sys.settrace(trace)
        store.save("p", refs, settings, memory, "key")
        sys.settrace(None)
        os.write(write, json.dumps(changes).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        changes = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), json.loads(changes or "[]")


def test_a_kill_at_any_moment_leaves_the_old_or_the_new_profile(tmp_path, caplog):
    """A replace is run once to find each state its writing leaves on disk (the line at which
    it appears), then killed at each of them; every next start has the old or the new."""
    refs = [(photo(tmp_path / f"r{k}.png", k), f"r{k}.png") for k in range(2)]
    memory = [torch.arange(12.0).reshape(3, 4), torch.ones(2, 4)]
    folder = tmp_path / "profiles"
    old = lambda: Profiles(folder).save("p", refs, {"threshold": 1.0}, memory, "key")  # noqa
    old()
    code, lines = replace_in_child(folder, refs[:1], {"threshold": 2.0}, memory[:1])
    assert code == 0 and len(lines) > 8  # temp folder, copies, memory, settings, renames, ...
    seen = set()
    for line in lines:
        old()
        assert replace_in_child(folder, refs[:1], {"threshold": 2.0}, memory[:1], line)[0] == 9
        with caplog.at_level(logging.WARNING, "vcp.profiles"):
            caplog.clear()
            store = Profiles(folder)
        profile = store.read("p")
        version = profile.settings["threshold"]
        seen.add(version)
        count = {1.0: 2, 2.0: 1}[version]
        assert [p.read_bytes() for p, _ in profile.references] == [
            r.read_bytes() for r, _ in refs[:count]]
        cached = store.memory(profile, "key", "cpu")
        assert all(torch.equal(a, b) for a, b in zip(cached, memory[:count], strict=True))
        assert sorted(os.listdir(folder)) == [".lock", "p"]
        assert [p["name"] for p in store.list()] == ["p"]
        left = [r.getMessage() for r in caplog.records]
        assert len(left) <= 1 and all("profiles in" in m for m in left)
    assert seen == {1.0, 2.0}


def test_recovery_says_what_it_did(tmp_path, caplog):
    refs = [(photo(tmp_path / "r.png", 0), "r.png")]
    folder = tmp_path / "profiles"
    store = Profiles(folder)
    store.save("old", refs, {"threshold": 1.0})
    store.save("kept", refs, {"threshold": 1.0})
    os.rename(folder / "old", folder / ".old-old-0123abcd")  # killed between the renames
    shutil.copytree(folder / "kept", folder / ".old-kept-0123abcd")  # killed before the rmtree
    (folder / ".new-half-0123abcd" / "references").mkdir(parents=True)
    (folder / "kept" / ".memory-key.safetensors.0123abcd.tmp").write_bytes(b"cut")
    with caplog.at_level(logging.WARNING, "vcp.profiles"):
        store = Profiles(folder)
    [line] = [r.getMessage() for r in caplog.records]
    for words in ("put back old", "removed kept's replaced version", "removed a half-written "
                  "half", "removed a half-written memory of kept"):
        assert words in line
    assert sorted(os.listdir(folder)) == [".lock", "kept", "old"]
    assert sorted(os.listdir(folder / "kept")) == ["profile.json", "references"]


def test_a_start_removes_the_upload_folders_of_killed_servers(tmp_path, monkeypatch, caplog,
                                                               predictor):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead, owner = claim_uploads()
    (dead / "job" / "images").mkdir(parents=True)
    os.close(owner)  # its server is gone: nobody holds the lock
    alive, owner = claim_uploads()
    (tmp_path / "vcp_app_being_made").mkdir()  # no owner file yet: left alone
    with caplog.at_level(logging.WARNING, "vcp.service"):
        service = Service(predictor)
    try:
        assert not dead.exists() and alive.exists() and (tmp_path / "vcp_app_being_made").exists()
        [line] = [r.getMessage() for r in caplog.records]
        assert line == f"removed 1 upload folder(s) that killed servers left: {dead.name}"
        assert remove_abandoned_uploads() == []
    finally:
        service.close()
        os.close(owner)
    assert not service.root.exists()
    assert remove_abandoned_uploads() == [alive.name]


def test_server_references_are_the_default_and_a_profile_may_go_meanwhile(
        photos, predictor, predicted, tmp_path, caplog):
    runtime = predictor.runtime
    references = sorted((photos / "good").iterdir())
    server = Predictor(runtime, make_strategy("reference", {}, Context(
        runtime, runtime.image_size, references)), batch_size=3)
    service = Service(server, profiles=Profiles(tmp_path / "profiles"))
    try:
        assert service.scoring(name="reference", fusion="sum") is None  # the server's own
        half = service.scoring(options={"coreset": 0.5})  # the server's references, a coreset
        assert [n for _, n in half.references] == [p.name for p in references]
        assert inspect(service, photos, half) == pytest.approx(predicted["coreset"], abs=1e-4)
        assert inspect(service, photos, None) == pytest.approx(predicted["reference"], abs=1e-4)

        finished(service.save_profile("a", "p", None, service.new_folder(), threshold=0.2))
        [cache] = (tmp_path / "profiles" / "p").glob("memory-*")
        cache.write_bytes(cache.read_bytes()[:100])  # damaged: built again, and replaced
        with caplog.at_level(logging.WARNING, "vcp.profiles"):
            assert inspect(service, photos, service.scoring(profile="p")) == pytest.approx(
                predicted["reference"], abs=1e-4)
        assert "its cached memory cannot be read" in caplog.text
        assert service.profiles.memory(service.profiles.read("p"), service.model_key, "cpu")

        used = service.scoring(profile="p")
        service.profiles.delete("p")
        folder, inputs = uploaded(service, {"images": [photos / "line" / "i0.png"]})
        job = service.submit("a", "inspect", inputs, folder, scoring=used)
        assert job.over.wait(60)
        assert job.error == "profile 'p' was replaced or deleted after this job was queued: " \
                            "run it again"
    finally:
        service.close()


def test_the_model_key_holds_every_weight_the_precision_and_the_device(predictor):
    runtime = predictor.runtime
    key = model_key(runtime)
    assert model_key(runtime) == key
    other = copy.deepcopy(runtime.model)
    with torch.no_grad():
        other.clip.visual.conv1.weight.view(-1)[7] += 1e-3  # one weight of the backbone
    assert model_key(TorchRuntime(other, runtime.device)) != key
    assert model_key(TorchRuntime(runtime.model, runtime.device, "bf16")) != key


# ---- over HTTP: profiles and a job's own scoring against a running app.py -------------------
class Line:
    """A line's ``app.py`` (the tiny model, ``photos`` shared, its profiles in ``box``, at most 3
    profiles of at most 4 references); ``start`` starts it again on the same folders."""

    def __init__(self, box: Path, flags: list[str]):
        self.box, self.flags, self.logs = box, flags, []
        self.profiles, self.tmp = box / "profiles", box / "tmp"
        self.start()

    def start(self) -> None:
        self.logs.append(open(self.box / f"server{len(self.logs)}.log", "w+"))
        self.served = Served([*self.flags, "--profiles_dir", str(self.profiles)], self.tmp,
                             self.logs[-1])
        self.client = Client(self.served.url)

    def log(self) -> str:
        return "".join(Path(f.name).read_text() for f in self.logs)


@pytest.fixture(scope="module")
def line(tmp_path_factory, photos, tiny_archive, tiny_checkpoint):
    line = Line(tmp_path_factory.mktemp("line"), [
        "--checkpoint_path", str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
        "--device", "cpu", "--allow_folder", str(photos), "--max_profiles", "3",
        "--max_profile_references", "4"])
    yield line
    assert line.served.stop() == -15
    assert list(line.tmp.iterdir()) == []  # its upload folder removed
    assert "Traceback" not in line.log()


def files(field: str, folder: Path, count: int | None = None) -> list[tuple[str, Path]]:
    return [(field, p) for p in sorted(folder.iterdir())[:count]]


def answered(client: Client, path: str, form) -> tuple[dict, dict[str, float]]:
    """``POST path`` (a predict call): its answer, and name -> max pixel score."""
    status, body = client.json(path, form=form)
    assert status == 200, body
    return body, {a["name"]: a["max_pixel_score"] for a in body["images"]}


def test_a_profile_over_the_api_scores_as_predict_reference(line, photos, predicted):
    client, expected = line.client, predicted["reference"]
    middle = sorted(expected.values())[1:3]
    t = float(np.mean(middle))  # between two scores: no verdict hangs on the last digit
    references, images = files("references", photos / "good"), files("images", photos / "line")
    status, made = client.json("/api/v1/profiles/bracket-7", method="PUT",
                               form=[*references, ("threshold", str(t))])
    assert status == 200, made
    assert {k: made[k] for k in ("name", "references", "reference_names", "threshold", "scoring",
                                 "fusion", "options")} == {
        "name": "bracket-7", "references": 4, "reference_names": [f"g{k}.png" for k in range(4)],
        "threshold": t, "scoring": "reference", "fusion": "sum", "options": {"coreset": 1.0}}
    assert client.json("/api/v1/profiles")[1] == [made]
    assert client.json("/api/v1/profiles/bracket-7")[1] == made

    body, scores = answered(client, "/api/v1/predict?profile=bracket-7", images)
    assert scores == pytest.approx(expected, abs=1e-4)
    assert body["threshold"] == t and body["profile"] == "bracket-7"
    assert {a["name"]: a["verdict"] for a in body["images"]} == {
        n: "NG" if s > t else "OK" for n, s in expected.items()}
    assert {"NG", "OK"} == {a["verdict"] for a in body["images"]}
    assert answered(client, "/api/v1/predict", [*images, ("profile", "bracket-7")])[0] == body
    zero_shot = answered(client, "/api/v1/predict", images)[1]
    assert zero_shot != pytest.approx(expected, abs=1e-4)

    # a job's own references, uploaded or in a shared folder, on the API and on the page
    own = answered(client, "/api/v1/predict", [*images, *references])[1]
    assert own == pytest.approx(expected, abs=1e-4)
    shared = answered(client, "/api/v1/predict", [*images, ("references_folder", "good")])[1]
    assert shared == own
    job = client.run_job([("kind", "inspect"), *images, *references])
    assert {r["name"]: r["max_pixel_score"] for r in job["results"]} == own
    assert job["scoring"] == {"scoring": "reference", "fusion": "sum", "references": 4,
                              "profile": None} and job["profile"] is None
    job = client.run_job([("kind", "inspect"), ("images_folder", "line"),
                          ("profile", "bracket-7")])
    assert {r["name"]: r["max_pixel_score"] for r in job["results"]} == {
        f"line/{n}": s for n, s in own.items()}
    assert job["profile"] == made and job["scoring"]["profile"] == "bracket-7"


def test_a_tile_absent_is_the_default_and_0_is_whole_images(predictor):
    """The form's tile: empty or absent -> None (the profile's, else the server's), 0 -> whole
    images even where the server tiles, SIDE -> tiles of SIDE at the server's overlap."""
    from utils.inference.tiling import Tiling
    from utils.serving.schemas import ScoringForm
    assert ScoringForm().tile is None and ScoringForm(tile="").tile is None
    assert ScoringForm(tile="0").tile == 0 and ScoringForm(tile="48").tile == 48
    tiled = copy.copy(predictor)
    tiled.tiling = Tiling(64, 0.5)
    assert tiled.tiling_for(None) == Tiling(64, 0.5) and tiled.tiling_for(0) is None
    assert tiled.tiling_for(48) == Tiling(48, 0.5)


def test_a_tile_per_job_and_per_profile_scores_as_predict_tile(line, photos, predicted_tiled):
    client, wide = line.client, files("images", photos / "wide")
    body, scores = answered(client, "/api/v1/predict", [*wide, ("tile", str(TILE))])
    assert scores == pytest.approx(predicted_tiled["zero_shot"], abs=1e-4)
    assert body["tile"] == TILE
    body, untiled = answered(client, "/api/v1/predict", [*wide, ("tile", "0")])
    assert "tile" not in body and untiled != pytest.approx(scores, abs=1e-4)

    status, made = client.json("/api/v1/profiles/tiled", method="PUT",
                               form=[*files("references", photos / "good"), ("tile", str(TILE))])
    assert status == 200 and made["tile"] == TILE, made
    assert made in client.json("/api/v1/profiles")[1]
    body, scores = answered(client, "/api/v1/predict?profile=tiled", wide)
    assert scores == pytest.approx(predicted_tiled["reference"], abs=1e-4)
    assert body["tile"] == TILE and body["profile"] == "tiled"
    # the page's job: the profile's tile, or the job's own first
    job = client.run_job([("kind", "inspect"), ("images_folder", "wide"), ("profile", "tiled")])
    assert job["tile"] == TILE and {r["name"]: r["max_pixel_score"] for r in job["results"]} \
        == {f"wide/{n}": s for n, s in scores.items()}
    job = client.run_job([("kind", "inspect"), *wide, ("profile", "tiled"), ("tile", "64")])
    assert job["tile"] == 64
    assert client.request("/api/v1/profiles/tiled", method="DELETE")[0] == 200


def big_photos(folder: Path, count: int, side: int = 1200) -> list[Path]:
    return [photo(folder / f"big{k}.png", 100 + k, (side, side)) for k in range(count)]


def test_profiles_survive_a_restart_and_a_kill_while_one_is_written(line, photos, tmp_path):
    client, store = line.client, line.profiles
    images = files("images", photos / "line")
    status, old = client.json("/api/v1/profiles/p", method="PUT", form=[
        *files("references", photos / "good", 2), ("threshold", "1.0")])
    assert status == 200, old
    before = answered(client, "/api/v1/predict?profile=p", images)[0]
    [cache] = (store / "p").glob("memory-*.safetensors")
    written = cache.stat().st_mtime_ns

    assert line.served.stop() == -15 and list(line.tmp.iterdir()) == []  # SIGTERM
    line.start()
    client = line.client
    assert old in client.json("/api/v1/profiles")[1]
    assert answered(client, "/api/v1/predict?profile=p", images)[0] == before
    assert cache.stat().st_mtime_ns == written  # its memory read from the cache, not rebuilt

    # a SIGKILL while the profile is replaced by 4 large references: as soon as its new
    # folder shows (or, if the write was too quick to see, once it is done)
    client.run_job([("kind", "inspect"), *images])  # a job kept: uploads in the upload folder
    [uploads] = list(line.tmp.iterdir())
    form = [("references", p) for p in big_photos(tmp_path, 4)] + [("threshold", "2.0")]

    def replace():
        with contextlib.suppress(OSError):  # the server is killed under it
            client.request("/api/v1/profiles/p", method="PUT", form=form)
    replacing = threading.Thread(target=replace, daemon=True)
    replacing.start()
    deadline = time.monotonic() + 60
    while replacing.is_alive() and time.monotonic() < deadline and \
            not any(e.name.startswith(".new-p-") for e in store.iterdir()):
        time.sleep(0.001)
    line.served.kill()
    replacing.join(30)
    line.start()
    client = line.client
    assert not uploads.exists() and len(list(line.tmp.iterdir())) == 1
    assert "removed 1 upload folder(s) that killed servers left" in line.log()
    [p] = [s for s in client.json("/api/v1/profiles")[1] if s["name"] == "p"]
    assert (p["threshold"], p["references"]) in [(1.0, 2), (2.0, 4)]  # the old one or the new
    assert not [e for e in os.listdir(store) if e.startswith(".") and e != ".lock"]
    body = answered(client, "/api/v1/predict?profile=p", images)[0]
    if p["threshold"] == 1.0:  # killed while it was written: the next start said so
        assert body == before
        assert re.search(r"profiles in .*(removed a half-written p|put back p)", line.log())


def test_hostile_profile_requests_are_refused_cleanly(line, photos, tmp_path):
    """Each refusal: its status, one line naming what is wrong, no traceback and no path."""
    client, other = line.client, Client(line.served.url)
    good = files("references", photos / "good")
    images = files("images", photos / "line")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    held = [s["name"] for s in client.json("/api/v1/profiles")[1]]
    for k in range(3 - len(held)):  # up to the limit of 3 profiles
        assert client.request(f"/api/v1/profiles/fill-{k}", method="PUT",
                              form=good[:1])[0] == 200
    job = client.run_job([("kind", "inspect"), *images[:1], *good[:1]])["id"]
    put = lambda name, form: dict(path=f"/api/v1/profiles/{name}", method="PUT", form=form)
    predict = lambda *form: dict(path="/api/v1/predict", form=[*images[:1], *form])
    rows = [  # (what, request, status, words in the message)
        *[(f"name {name!r}", put(name, good[:1]), 400, "expected 1 to 64 letters, digits")
          for name in ["..%2F..%2Fetc", "%2e%2e", "a.b", "a%20b", "caf%C3%A9", "x" * 65, "%00",
                       "", "a%2Fb"]],
        ("a name to read", dict(path="/api/v1/profiles/.lock"), 400, "letters, digits"),
        ("a name to delete", dict(path="/api/v1/profiles/..", method="DELETE"), 400, "letters"),
        ("no such profile", dict(path="/api/v1/profiles/absent"), 404, "no profile 'absent'"),
        ("delete no such profile", dict(path="/api/v1/profiles/absent", method="DELETE"), 404,
         "no profile 'absent'"),
        ("predict with no such profile", dict(path="/api/v1/predict?profile=absent",
                                              form=images[:1]), 404, "no profile 'absent'"),
        ("a job with no such profile", dict(path="/api/jobs", form=[
            ("kind", "inspect"), *images[:1], ("profile", "absent")]), 404, "no profile"),
        ("too many references", put("fill-0", [*good, ("references", photos / "line" / "i0.png")]),
         413, "at most 4 (the references-per-profile limit)"),
        ("too many profiles", put("fourth", good[:1]), 413, "at most 3 profiles (the profiles "
                                                            "limit)"),
        ("a corrupt reference of a profile", put("fill-0", [*good[:1], ("references", bad)]),
         400, "reference image bad.png: cannot read it"),
        ("a corrupt reference of a call", predict(("references", bad)), 400,
         "reference image bad.png: cannot read it"),
        ("another client's job", dict(path=f"/api/jobs/{job}", client=other), 404, "no job"),
        ("a profile and references", predict(("profile", "fill-0"), *good[:1]), 400,
         "a profile or those, not both"),
        ("two different profiles", dict(path="/api/v1/predict?profile=a",
                                        form=[*images[:1], ("profile", "b")]), 400,
         "given twice"),
        ("references for MuSc", predict(("scoring", "mutual"), *good[:1]), 400,
         "read by reference scoring only"),
        ("MuSc of one image", predict(("scoring", "mutual")), 400, "at least"),
        ("a coreset above 1", predict(*good[:1], ("coreset", "2")), 422,
         "coreset: Input should be less than or equal to 1"),
        ("an unknown scoring", predict(("scoring", "best")), 422, "scoring: Input should be"),
        ("an unknown fusion", predict(("fusion", "max")), 422, "fusion: Input should be"),
        ("a field the server does not take", predict(("tile_overlap", "0.5")), 422,
         "tile_overlap: Extra inputs are not permitted"),
        ("a tile below 16 px", predict(("tile", "8")), 422,
         "tile: Value error, expected 0 (whole images) or a tile side of at least 16"),
        ("a tile that is no number", predict(("tile", "abc")), 422,
         "tile: Input should be a valid integer"),
        ("a page's job with a negative tile", dict(path="/api/jobs", form=[
            ("kind", "inspect"), *images[:1], ("tile", "-5")]), 422, "tile: Value error"),
        ("a profile's tile below 16 px", put("fill-0", [*good[:1], ("tile", "15")]), 422,
         "tile: Value error"),
        ("a profile's threshold nan", put("fill-0", [("threshold", "nan")]), 422,
         "threshold: Input should be a finite number"),
    ]
    internal = [str(line.box), str(photos), str(tmp_path), str(ROOT), "Traceback", 'File "']
    for what, request, expected, words in rows:
        status, body = request.pop("client", client).request(**request)
        text = body.decode(errors="replace")
        assert status == expected, (what, status, text)
        message = json.loads(text)["error"]
        assert words in message and "\n" not in message, (what, message)
        assert not any(s in text for s in internal), (what, text)
    assert [e for e in os.listdir(line.profiles) if e.startswith(".")] == [".lock"]
    for k in range(3 - len(held)):
        assert client.request(f"/api/v1/profiles/fill-{k}", method="DELETE")[0] == 200
    assert [s["name"] for s in client.json("/api/v1/profiles")[1]] == held
    assert "Traceback" not in line.log()
