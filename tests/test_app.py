"""The inspection page (app.py): its endpoints over HTTP, and the page itself in a headless Chromium
(upload two images, move the threshold, read the overlay and the mask off the page).

Run as a script it drives the page of a running server and saves screenshots (the README's):

    python tests/test_app.py --url http://127.0.0.1:7860 --images a.png b.png --out figures
"""
from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import shutil
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.http_client import Client
from utils.cli import predictor_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


# ---- a server on a free port, in this process (so the test can count model runs) -----------
class Server:
    def __init__(self, service, access=None):
        import uvicorn

        import app
        from utils.serving.web import Access, create_app
        self.sock = app.listen("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service, access or Access()),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class Counted:
    """A predictor that counts its runs (the page's only way to the model)."""

    def __init__(self, run):
        self.run, self.calls = run, []

    def __getattr__(self, name):  # its runtime, strategy, batch size: the predictor's
        return getattr(self.run, name)

    def __call__(self, paths, tile=None):
        self.calls.append(len(paths))
        return self.run(paths, tile)


@pytest.fixture(scope="module")
def served(tiny_archive, tiny_checkpoint, images):
    """(server, service, calls): the tiny model behind the page, ``images`` shared; ``calls``
    counts the model's runs."""
    import predict
    from utils.serving.service import Service
    args = predict.parse_args(["--checkpoint_path", str(tiny_checkpoint), "--pretrained_path",
                               str(tiny_archive), "--device", "cpu", "--batch_size", "2",
                               "--num_workers", "0"])
    counted = Counted(predictor_of(args))
    service = Service(counted, folders=[images], threshold=0.5, description="tiny")
    server = Server(service)
    yield server, service, counted.calls
    server.stop()
    assert not service.root.exists()  # the uploads are removed when the server stops


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(d / "wide.png")
    tall = np.full((70, 40, 3), 120, np.uint8)
    tall[20:40, 10:30] = (250, 30, 30)
    Image.fromarray(tall).save(d / "tall.jpg", quality=95)
    Image.fromarray(rng.integers(0, 65535, (30, 30)).astype(np.uint16)).save(d / "deep.tif")
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    return d


def expected_map(path, tiny_archive, tiny_checkpoint):
    """An independent oracle: the model run by hand, the docs/reproduction.md §10 blend without
    normalization."""
    import torch
    from scipy.ndimage import gaussian_filter

    from model import build_vcp_clip, checkpoint_configs, read_checkpoint
    from utils.data.dataset import image_transform
    from utils.data.images import read_rgb
    cfg = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    model = build_vcp_clip(tiny_archive, cfg, checkpoint=tiny_checkpoint)
    with torch.no_grad():
        raw, new = model(image_transform(cfg.image_size)(read_rgb(path))[None]).abnormal()
    return gaussian_filter(0.2 * raw[0].numpy() + 0.8 * new[0].numpy(), sigma=8)


# ---- endpoints over HTTP -------------------------------------------------------------------
def test_inspect_job_outputs_and_bad_input(served, images, tiny_archive, tiny_checkpoint):
    server, service, calls = served
    client = Client(server.url)
    job = client.run_job([("kind", "inspect"), ("images", images / "wide.png"),
                          ("images", images / "notes.txt"), ("images", images / "empty.png"),
                          ("images", images / "deep.tif"), ("images", images / "wide.png")])
    assert job["error"] is None and job["total"] == job["done"] == 5
    assert job["state"] == "finished"
    assert [r["name"] for r in job["results"]] == ["wide.png", "deep.tif", "wide.png"]
    assert sorted(s["name"] for s in job["skipped"]) == ["empty.png", "notes.txt"]
    assert all(str(service.root) not in s["reason"] for s in job["skipped"])
    wide = job["results"][0]
    amap = expected_map(images / "wide.png", tiny_archive, tiny_checkpoint)
    assert wide["max_pixel_score"] == pytest.approx(float(amap.max()), abs=1e-5)

    # image, overlay and mask at the input's size; the mask is the kept map above T
    from utils.inference.outputs import binary_mask, full_size
    base = f"/api/jobs/{job['id']}"
    shown = lambda path: np.asarray(Image.open(io.BytesIO(client.request(base + path)[1])))
    assert shown("/image/3.png").shape == (30, 30, 3)  # the 16-bit TIFF, as 8-bit RGB
    assert shown("/overlay/0.png").shape == (48, 64, 3)
    assert shown("/overlay/0.png?side=32").shape == (24, 32, 3)  # a thumbnail
    runs = len(calls)
    t = float(np.median(amap))
    mask = shown(f"/mask/0.png?threshold={t}")
    kept = service.jobs[job["id"]].item(0).amap
    assert np.abs(kept - amap).max() < 1e-5
    assert np.array_equal(mask, binary_mask(full_size(kept, (64, 48)), t))
    assert 0 < (mask > 0).mean() < 1
    with zipfile.ZipFile(io.BytesIO(client.request(f"{base}/masks.zip?threshold={t}")[1])) as z:
        assert sorted(z.namelist()) == ["masks/deep.png", "masks/wide.png", "masks/wide_1.png"]
        assert np.array_equal(np.asarray(Image.open(z.open("masks/wide.png"))), mask)
    rows = list(csv.DictReader(io.StringIO(client.request(base + "/scores.csv")[1].decode())))
    assert [r["path"] for r in rows] == ["wide.png", "deep.tif", "wide.png"]
    assert rows[0]["max_pixel_score"] == rows[2]["max_pixel_score"]
    assert float(rows[0]["max_pixel_score"]) == pytest.approx(wide["max_pixel_score"])
    status, data = client.json(base + "/map/0")  # the map the page draws contours from
    sent = np.frombuffer(base64.b64decode(data["data"]), "<f4")
    assert np.array_equal(sent.reshape(data["height"], data["width"]), kept)
    assert len(calls) == runs  # masks at new thresholds never run the model again

    # bad requests: a message, and the server keeps serving; a field that does not fit its
    # schema is a 422 naming it
    for form, expected, message in [
            ([("kind", "inspect")], 400, "no images given"),
            ([("kind", "inspect"), ("images_folder", str(images / "nowhere"))], 400, "nowhere"),
            ([("kind", "calibrate"), ("normal", images / "wide.png"),
              ("false_alarm_rate", "2")], 422, "false_alarm_rate: Input should be less than 1"),
            ([("kind", "paint")], 422, "kind: Input should be 'inspect' or 'calibrate', got "
                                       "'paint'"),
            ([("images", images / "wide.png")], 422, "kind: Field required")]:
        status, body = client.json("/api/jobs", form=form)
        assert status == expected and message in body["error"], body
    status, body = client.json(f"{base}/mask/0.png?threshold=high")
    assert status == 422 and body["error"].startswith("threshold: ") and "'high'" in body["error"]
    assert client.request(f"{base}/mask/7.png?threshold=0.5")[0] == 404
    assert client.request("/api/jobs/999")[0] == 404
    assert Client(server.url).request(base)[0] == 404  # another client: not its job
    only_bad = client.run_job([("kind", "inspect"), ("images", images / "notes.txt")])
    assert only_bad["results"] == [] and len(only_bad["skipped"]) == 1
    assert client.request("/")[0] == 200


def test_calibrate_job(served, images):
    from utils.evaluation.calibration import threshold_for
    client = Client(served[0].url)
    inspected = client.run_job([("kind", "inspect"), ("images_folder", str(images))])
    scores = {r["name"].rsplit("/", 1)[1]: r["max_pixel_score"] for r in inspected["results"]}
    assert sorted(scores) == ["deep.tif", "tall.jpg", "wide.png"]  # a folder: images only
    job = client.run_job([("kind", "calibrate"), ("false_alarm_rate", "0.5"),
                          ("normal", images / "wide.png"), ("normal", images / "deep.tif"),
                          ("normal", images / "notes.txt"), ("defective", images / "tall.jpg")])
    cal = job["calibration"]
    normal = [scores["wide.png"], scores["deep.tif"]]
    assert cal["threshold"] == pytest.approx(threshold_for(normal, 0.5))
    assert cal["recall"] == float(scores["tall.jpg"] > cal["threshold"])
    assert [s["name"] for s in job["skipped"]] == ["notes.txt"]
    failed = client.run_job([("kind", "calibrate"), ("normal", images / "notes.txt")])
    assert "none of the normal images" in failed["error"]


def test_the_line_api(served, images):
    """POST /api/v1/predict answers each image at once, as a job of the page scores it."""
    from utils.inference.outputs import binary_mask, full_size
    from utils.serving.web import rle
    server, service, _ = served
    client = Client(server.url)
    form = [("images", images / "wide.png"), ("images", images / "notes.txt"),
            ("images", images / "tall.jpg")]
    job = client.run_job([("kind", "inspect"), *form])
    scores = {r["name"]: r["max_pixel_score"] for r in job["results"]}
    t = float(np.mean(list(scores.values())))
    kept = service.jobs[job["id"]].item(0).amap
    held = set(service.jobs)
    for mask in ("png", "rle"):
        status, body = client.json("/api/v1/predict", form=[*form, ("threshold", str(t)),
                                                            ("mask", mask)])
        assert status == 200 and body["threshold"] == t
        wide, notes, tall = body["images"]
        assert [wide["name"], notes["name"], tall["name"]] == ["wide.png", "notes.txt",
                                                               "tall.jpg"]
        assert "cannot read it" in notes["skipped"] and "image_score" not in notes
        for answer in (wide, tall):
            assert answer["max_pixel_score"] == pytest.approx(scores[answer["name"]])
            assert answer["verdict"] == ("NG" if scores[answer["name"]] > t else "OK")
        expected = binary_mask(full_size(kept, (64, 48)), t)
        if mask == "png":
            got = np.asarray(Image.open(io.BytesIO(base64.b64decode(wide["mask"]))))
            assert np.array_equal(got, expected)
        else:
            assert wide["mask"] == rle(expected) and sum(wide["mask"]["counts"]) == 64 * 48
    assert rle(np.array([[255, 255, 0], [0, 0, 255]])) == {"size": [2, 3], "counts": [0, 2, 3, 1]}
    status, body = client.json("/api/v1/predict", form=[("images", images / "wide.png")])
    assert status == 200 and "mask" not in body["images"][0]
    status, body = client.json("/api/v1/predict", form=[("threshold", "0.5")])
    assert status == 422 and body["error"] == "images: Field required"
    too_many = [("images", images / "wide.png")] * (service.limits.sync_images + 1)
    status, body = client.json("/api/v1/predict", form=too_many)
    assert status == 413 and "at most 16" in body["error"]
    assert set(service.jobs) == held  # each call's job is dropped once answered
    # the document describes what the server takes and answers
    status, spec = client.json("/api/v1/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    post = spec["paths"]["/api/v1/predict"]["post"]
    schemas = spec["components"]["schemas"]
    ref = lambda holder: schemas[holder["schema"]["$ref"].rsplit("/", 1)[1]]
    form = ref(post["requestBody"]["content"]["multipart/form-data"])
    assert set(form["properties"]) == {"images", "threshold", "mask", "profile", "references",
                                       "references_folder", "scoring", "fusion", "coreset",
                                       "tile"}
    assert "at least 16" in form["properties"]["tile"]["description"]
    assert form["additionalProperties"] is False  # an unknown field is refused, not ignored
    assert form["required"] == ["images"]
    assert form["properties"]["mask"]["enum"] == ["none", "png", "rle"]
    answer = ref(post["responses"]["200"]["content"]["application/json"])
    image = schemas[answer["properties"]["images"]["items"]["$ref"].rsplit("/", 1)[1]]
    answered = {k for a in (wide, notes, tall) for k in a}
    assert answered <= set(image["properties"]) and "mask" in answered
    for code in ("413", "422"):
        assert set(ref(post["responses"][code]["content"]["application/json"])[
            "properties"]) == {"error"}
    assert spec["security"] == [{"token": []}]


def test_an_unexpected_error_answers_one_line(served, monkeypatch, caplog, capfd):
    """A bug answers 500 with one line; the log names its type, without a traceback."""
    server, service, _ = served

    def broken(*args):
        raise ZeroDivisionError("/internal/path")
    monkeypatch.setattr(service, "status", broken)
    status, body = Client(server.url).json("/api/jobs/x")
    assert status == 500 and body == {"error": "internal error; the server's log names it"}
    logged = caplog.text + "".join(capfd.readouterr())
    assert "ZeroDivisionError" in logged
    assert "Traceback" not in logged and "/internal/path" not in logged


def test_command_line_errors(tmp_path, tiny_archive, capsys):
    import app
    taken = app.listen("127.0.0.1", 0)
    try:
        port = str(taken.getsockname()[1])
        missing = ["--port", "0", "--checkpoint_path", str(tmp_path / "none.pth")]
        (tmp_path / "a_file").write_text("")
        not_a_folder = ["--port", "0", "--profiles_dir", str(tmp_path / "a_file" / "profiles")]
        for flags, message in [(["--port", port], f"--port {port}: cannot listen there"),
                               (missing, "none.pth"),
                               (not_a_folder, "a_file is a file, not a folder")]:
            assert app.main(["--pretrained_path", str(tiny_archive), *flags]) == 2
            err = capsys.readouterr().err
            assert err.startswith("error: ") and message in err and "Traceback" not in err
    finally:
        taken.close()


def test_reference_scoring_as_predict(tmp_path, images, tiny_archive, tiny_checkpoint):
    """With --reference the page scores its uploads as predict.py scores a folder of them."""
    import app
    import predict
    model = ["--checkpoint_path", str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
             "--device", "cpu", "--reference", str(images / "wide.png")]
    folder = tmp_path / "batch"
    folder.mkdir()
    for name in ("tall.jpg", "deep.tif"):
        shutil.copy(images / name, folder / name)
    assert predict.main([str(folder), "--save_path", str(tmp_path / "out"), "--num_workers", "0",
                         *model]) == 0
    with open(tmp_path / "out" / "scores.csv") as f:
        expected = {r["path"].rsplit("/", 1)[1]: float(r["max_pixel_score"])
                    for r in csv.DictReader(f)}
    from utils.serving.service import Service
    server = Server(Service(predictor_of(app.parse_args(model))))
    try:
        job = Client(server.url).run_job([("kind", "inspect"), ("images", images / "tall.jpg"),
                                   ("images", images / "deep.tif")])
    finally:
        server.stop()
    assert {r["name"]: r["max_pixel_score"] for r in job["results"]} == pytest.approx(expected)


# ---- the page in a real browser ------------------------------------------------------------
def find_browser() -> tuple[str, str] | None:
    browser = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    driver = next((shutil.which(d) for d in DRIVERS if shutil.which(d)), None)
    return (browser, driver) if browser and driver else None


def start_browser():
    """Headless Chromium through Selenium and the system's chromedriver (no download)."""
    found = find_browser()
    if found is None:
        pytest.skip("no chromium + chromedriver on this machine (`make browser` installs them "
                    "with apt-get as root; the page's browser test needs them)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1400"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(found[1]))


PIXELS_JS = """
const img = arguments[0];
const c = document.createElement('canvas');
c.width = img.naturalWidth; c.height = img.naturalHeight;
const g = c.getContext('2d');
g.drawImage(img, 0, 0);
return Array.from(g.getImageData(0, 0, c.width, c.height).data);
"""


def pixels(driver, img) -> np.ndarray:
    """The RGB pixels an <img> on the page shows, [H, W, 3] uint8."""
    w, h = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                 img)
    rgba = np.array(driver.execute_script(PIXELS_JS, img), dtype=np.uint8)
    return rgba.reshape(h, w, 4)[..., :3]


def wait(driver, condition, what, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: condition(d), message=f"page: {what}")


def loaded(driver, img) -> bool:
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                 img)


def screenshot(element, path: Path) -> None:
    """A PNG of what the element shows, in 128 colours (small enough for the README)."""
    Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB").quantize(128).save(
        path, optimize=True)


def slider_step(driver) -> float:
    from selenium.webdriver.common.by import By
    return float(driver.find_element(By.ID, "threshold").get_attribute("step"))


PICTURE_REQUESTS_JS = """
return performance.getEntriesByType('resource')
  .filter((e) => /\\/(overlay|mask|image|map)\\//.test(e.name)).length;
"""

CONTOUR_JS = """
const c = document.getElementById('contour'), img = state.image;
if (!img || !c.width) return -1;  // not drawn yet
const plain = document.createElement('canvas');
plain.width = c.width; plain.height = c.height;
plain.getContext('2d').drawImage(img, 0, 0);
const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
const b = plain.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let n = 0;
for (let i = 0; i < a.length; i += 4) n += a[i] !== b[i] || a[i + 1] !== b[i + 1];
return n;
"""


def rows(driver) -> list[dict]:
    """The gallery's rows as the page shows them."""
    from selenium.webdriver.common.by import By
    out = []
    for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tr"):
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        out.append({"index": int(cells[0]), "name": cells[2], "image_score": float(cells[3]),
                    "max_pixel_score": float(cells[4]), "verdict": cells[5], "element": tr})
    return out


def upload(driver, url, image_paths, count=None):
    """Open the page, upload the images, wait until ``count`` (default: all) have a row."""
    driver.get(url)
    driver.execute_script("performance.setResourceTimingBufferSize(100000)")
    run_images(driver, image_paths, count)


def run_images(driver, image_paths, count=None):
    """Choose the images on the open page and run them; wait until ``count`` (default: all)
    have a row."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in image_paths))
    driver.find_element(By.ID, "run").click()
    n = len(image_paths) if count is None else count
    wait(driver, lambda d: d.find_element(By.ID, "cancel").get_attribute("hidden") is not None
         and f"of {n} images at T" in d.find_element(By.ID, "alarm-count").text,
         f"{n} results", timeout=120)


def shown_t(driver) -> float:
    from selenium.webdriver.common.by import By
    return float(driver.find_element(By.ID, "threshold-value").get_attribute("value"))


def move_slider(driver, presses: int) -> float:
    """Press an arrow key on the slider ``presses`` times (negative: down); the new T."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    driver.find_element(By.ID, "threshold").send_keys(
        (Keys.ARROW_RIGHT if presses > 0 else Keys.ARROW_LEFT) * abs(presses))
    return shown_t(driver)


def drive(driver, url, image_paths, steps, out=None):
    """Upload the images, open the first one, move the slider ``steps(driver)`` presses; with
    ``out`` saves screenshots there. Returns the rows and the T the page shows."""
    from selenium.webdriver.common.by import By
    upload(driver, url, image_paths)
    rows(driver)[0]["element"].click()
    wait(driver, lambda d: loaded(d, d.find_element(By.ID, "detail-overlay"))
         and d.execute_script("return document.getElementById('contour').width") > 0,
         "the first image's view")
    t = move_slider(driver, steps(driver))
    if out:
        driver.execute_script("window.scrollTo(0, 0)")
        screenshot(driver.find_element(By.TAG_NAME, "body"), Path(out) / "app_inspect.png")
    return rows(driver), t


def calibrate_on_page(driver, normal, defective, rate: str, out=None) -> str:
    """Calibrate on the page with these files; returns the result's text (with ``out`` saves a
    screenshot of it)."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.ID, "cal-normal").send_keys("\n".join(map(str, normal)))
    if defective:
        driver.find_element(By.ID, "cal-defective").send_keys("\n".join(map(str, defective)))
    rate_box = driver.find_element(By.ID, "cal-rate")
    rate_box.clear()
    rate_box.send_keys(rate)
    driver.find_element(By.ID, "cal-run").click()
    text = wait(driver, lambda d: d.find_element(By.ID, "cal-text").text, "the calibration")
    if out:
        section = driver.find_element(By.ID, "cal-result").find_element(By.XPATH, "..")
        driver.execute_script("arguments[0].scrollIntoView()", section)
        screenshot(section, Path(out) / "app_calibrate.png")
    return text


@pytest.mark.browser
def test_page_in_a_browser(served, images, tmp_path, tiny_archive, tiny_checkpoint):
    server, service, calls = served
    driver = start_browser()
    try:
        from selenium.webdriver.common.by import By
        from utils.data.images import read_rgb
        from utils.inference.outputs import full_size, overlay
        uploads = [images / "wide.png", images / "tall.jpg"]
        amaps = [expected_map(path, tiny_archive, tiny_checkpoint) for path in uploads]
        # from the first T (0.5) to about the maps' median, so that the contours are partial
        steps = lambda d: round((np.median(amaps) - 0.5) / slider_step(d)) or -1
        shown, t = drive(driver, server.url, uploads, steps, out=tmp_path)
        runs = len(calls)
        assert np.min(amaps) < t < np.max(amaps)  # T moved into the maps' range
        for row, path, amap in zip(shown, uploads, amaps):
            assert row["name"] == path.name
            assert row["max_pixel_score"] == pytest.approx(float(amap.max()), abs=1e-4)
            assert row["verdict"] == ("NG" if amap.max() > t else "OK")
        # the view of the first image: the page's heat map is the oracle's map over the image
        image = np.asarray(read_rgb(uploads[0]))
        shown_overlay = pixels(driver, driver.find_element(By.ID, "detail-overlay"))
        expected = overlay(image, full_size(amaps[0], image.shape[1::-1]))
        assert np.abs(shown_overlay.astype(int) - expected).max() <= 1
        # the contour of map > T drawn over the image: pixels at a T inside the map, none above
        assert driver.execute_script(CONTOUR_JS) > 0 or amaps[0].max() <= t
        box = driver.find_element(By.ID, "threshold-value")
        box.clear()
        box.send_keys(f"{amaps[0].max() + 0.01:.4f}\n")
        wait(driver, lambda d: d.execute_script(CONTOUR_JS) == 0, "no contour above the map")
        assert len(calls) == runs  # moving T did not run the model

        # calibration: T on the page is the quantile of the normal images' max pixel scores
        from utils.evaluation.calibration import threshold_for
        normal = [images / "wide.png", images / "deep.tif"]
        text = calibrate_on_page(driver, normal, [images / "tall.jpg"], "0.5", out=tmp_path)
        scores = [float(expected_map(p, tiny_archive, tiny_checkpoint).max()) for p in normal]
        t_cal = threshold_for(scores, 0.5)
        assert text.startswith(f"T = {t_cal:.4f} for a false-alarm rate of 50.0 %")
        assert "of 1 defective images above T" in text
        assert len(driver.find_elements(By.CSS_SELECTOR, "#histogram rect")) == 60
        driver.find_element(By.ID, "cal-use").click()
        wait(driver, lambda d: shown_t(d) == pytest.approx(t_cal, abs=1e-5), "the calibrated T")
        for shot in ("app_inspect.png", "app_calibrate.png"):
            assert Image.open(tmp_path / shot).size[0] > 600
    finally:
        driver.quit()


@pytest.mark.browser
def test_normal_images_and_a_profile_on_the_page(tiny_archive, tiny_checkpoint, images,
                                                  tmp_path):
    """A job with normal images chosen on the page scores as the API does with them (not as
    zero-shot); Calibrate T then Save as profile writes them with T, and after a restart the
    profile is listed, picked (its T on the slider) and scores as the API's ?profile=; the tile
    size typed reaches the job."""
    import predict
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from utils.serving.profiles import Profiles
    from utils.serving.service import Service
    predictor = predictor_of(predict.parse_args([
        "--checkpoint_path", str(tiny_checkpoint), "--pretrained_path", str(tiny_archive),
        "--device", "cpu", "--num_workers", "0"]))
    rng = np.random.default_rng(5)
    references = [tmp_path / f"good{k}.png" for k in range(3)]
    for path in references:
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    inspected = [images / "wide.png", images / "tall.jpg"]
    form = [("images", p) for p in inspected]
    start = lambda: Server(Service(predictor, profiles=Profiles(tmp_path / "profiles"),
                                   description="tiny"))
    scores = lambda answer: {a["name"]: a["max_pixel_score"] for a in answer["images"]}
    shown = lambda d: {r["name"]: r["max_pixel_score"] for r in rows(d)}
    said = lambda d: d.find_element(By.ID, "job-scoring").text
    server, driver = start(), start_browser()
    try:
        client = Client(server.url)
        zero_shot = scores(client.json("/api/v1/predict", form=form)[1])
        own = scores(client.json("/api/v1/predict", form=[
            *form, *[("references", p) for p in references]])[1])
        driver.get(server.url)
        wait(driver, lambda d: d.find_element(By.ID, "profile-box").is_displayed(), "profiles")
        driver.find_element(By.ID, "references").send_keys("\n".join(map(str, references)))
        assert Select(driver.find_element(By.ID, "scoring")).first_selected_option \
            .get_attribute("value") == "reference"
        run_images(driver, inspected)
        assert shown(driver) == pytest.approx(own, abs=1e-4)
        assert shown(driver) != pytest.approx(zero_shot, abs=1e-4)
        assert said(driver) == ("scored with reference scoring against 3 normal image(s); "
                                "whole images")

        calibrate_on_page(driver, [images / "deep.tif", images / "wide.png"], [], "0.5")
        t = driver.execute_script("return state.calibrated")
        driver.find_element(By.ID, "profile-name").send_keys("bracket-7")
        driver.find_element(By.ID, "save-profile").click()
        wait(driver, lambda d: "saved profile bracket-7" in d.find_element(By.ID, "messages")
             .text, "the saved profile")
        status, saved = client.json("/api/v1/profiles/bracket-7")
        assert status == 200 and saved["references"] == 3 and saved["threshold"] == t
        assert saved["reference_names"] == [p.name for p in references]
    finally:
        server.stop()

    server = start()  # a restart: the profile is read from the disk
    try:
        driver.get(server.url)
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#profile option")) == 2,
             "the profile listed")
        Select(driver.find_element(By.ID, "profile")).select_by_value("bracket-7")
        assert shown_t(driver) == pytest.approx(t, rel=1e-5)
        run_images(driver, inspected)
        by_profile = scores(Client(server.url).json("/api/v1/predict?profile=bracket-7",
                                                    form=form)[1])
        assert by_profile == pytest.approx(own, abs=1e-6)
        assert shown(driver) == pytest.approx(by_profile, abs=1e-4)  # 4 decimals shown
        assert said(driver).startswith("scored with profile bracket-7: 3 normal image(s), "
                                       "reference scoring, its T ")
        # the tile size reaches the job: its status says the tiles it ran with
        driver.find_element(By.ID, "tile").send_keys("24")
        driver.find_element(By.ID, "run").click()  # the same images again
        wait(driver, lambda d: said(d).endswith("; tiles of 24 px"), "the job's tiles")
    finally:
        driver.quit()
        server.stop()


@pytest.mark.browser
def test_the_api_docs_page_offline(served, images):
    """/api/v1/docs draws every endpoint of the OpenAPI document from this server alone, and its
    form sends a real request: the predict answer equals the API's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    server, service, _ = served
    status, spec = Client(server.url).json("/api/v1/openapi.json")
    driver = start_browser()
    try:
        driver.get(server.url + "/api/v1/docs")
        boxes = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "details[data-operation]"),
                     "the operations")
        drawn = {b.get_attribute("data-operation") for b in boxes}
        assert drawn == {f"{m.upper()} {p}" for p, ms in spec["paths"].items() for m in ms}
        box = next(b for b in boxes if b.get_attribute("data-operation") == "POST /api/v1/predict")
        box.find_element(By.TAG_NAME, "summary").click()
        box.find_element(By.CSS_SELECTOR, "input[name=images]").send_keys(
            "\n".join(str(images / n) for n in ("wide.png", "tall.jpg")))
        Select(box.find_element(By.CSS_SELECTOR, "select[name=mask]")).select_by_value("rle")
        box.find_element(By.TAG_NAME, "button").click()
        out = wait(driver, lambda d: box.find_element(By.TAG_NAME, "pre").text.startswith("200")
                   and box.find_element(By.TAG_NAME, "pre").text, "the answer")
        answer = json.loads(out.split("\n", 1)[1])
        status, direct = Client(server.url).json("/api/v1/predict", form=[
            ("images", images / "wide.png"), ("images", images / "tall.jpg"), ("mask", "rle")])
        assert status == 200 and answer == direct
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map((e) => e.name)")
        assert loaded and all(u.startswith(server.url) for u in loaded), loaded  # no CDN
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    """200 small images, a red stain on every third."""
    d = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(1)
    for k in range(200):
        image = rng.integers(60, 140, (40, 48, 3), dtype=np.uint8)
        if k % 3 == 0:
            image[10:22, 12:26] = (250, 30, 30)
        Image.fromarray(image).save(d / f"part_{k:03d}.png")
    return sorted(d.iterdir())


@pytest.mark.browser
def test_a_gallery_of_200_images(served, many_images, tmp_path):
    """Sort, filter and page 200 results; the slider changes verdicts with no request."""
    from selenium.webdriver.common.by import By
    server, service, calls = served
    driver = start_browser()
    try:
        upload(driver, server.url, many_images)
        scores = {r["name"]: r["max_pixel_score"] for r in service.jobs[
            next(reversed(service.jobs))].status()["results"]}
        assert len(scores) == 200 and len(rows(driver)) == 50  # a page of 50
        assert "page 1 of 4" in driver.find_element(By.ID, "page-text").text
        driver.find_element(By.CSS_SELECTOR, 'th[data-sort="max_pixel_score"]').click()
        top = [r["max_pixel_score"] for r in rows(driver)]
        assert top == sorted(top, reverse=True)
        assert top[0] == pytest.approx(max(scores.values()), abs=1e-4)
        driver.find_element(By.ID, "next").click()
        assert rows(driver)[0]["max_pixel_score"] <= top[-1]

        # 20 presses of the slider: the verdicts follow, with no request per image (the scores
        # came once)
        set_t = lambda t: (box.clear(), box.send_keys(f"{t:.7f}\n"))
        box = driver.find_element(By.ID, "threshold-value")
        median = float(np.median(list(scores.values())))
        set_t(median)
        before = driver.execute_script(PICTURE_REQUESTS_JS)
        for presses in (10, -10):
            t = move_slider(driver, presses)
            ng = sum(s > t for s in scores.values())
            assert driver.find_element(By.ID, "alarm-count").text == \
                f"{ng} NG, {200 - ng} OK of 200 images at T"
        assert driver.execute_script(PICTURE_REQUESTS_JS) == before
        set_t(median)
        driver.find_element(By.ID, "only-ng").click()
        page = rows(driver)
        assert len(page) == 50 and all(r["verdict"] == "NG" for r in page)
        assert "(100 images shown)" in driver.find_element(By.ID, "page-text").text
        assert driver.execute_script(PICTURE_REQUESTS_JS) - before <= 50  # new thumbnails only
        rows(driver)[0]["element"].click()  # its view: the image with the contour at T
        wait(driver, lambda d: d.execute_script(CONTOUR_JS) > 0, "the contour of the first NG")
        driver.execute_script("window.scrollTo(0, 0)")
        screenshot(driver.find_element(By.TAG_NAME, "body"), tmp_path / "app_gallery.png")
        assert Image.open(tmp_path / "app_gallery.png").size[0] > 600
    finally:
        driver.quit()


class Gated(Counted):
    """The tiny model, each image waiting for ``gate`` to be open."""

    def __init__(self, run):
        super().__init__(run)
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, paths, tile=None):
        for result in super().__call__(paths, tile):
            assert self.gate.wait(60)
            yield result


@pytest.mark.browser
def test_a_cancelled_and_an_expired_job_on_the_page(tiny_archive, tiny_checkpoint, images):
    import predict
    from selenium.webdriver.common.by import By
    from utils.serving.service import Limits, Service
    args = predict.parse_args(["--checkpoint_path", str(tiny_checkpoint), "--pretrained_path",
                               str(tiny_archive), "--device", "cpu", "--num_workers", "0"])
    model = Gated(predictor_of(args))
    # maps of three 56x56 images: a second user's job of two pushes a finished one out
    service = Service(model, Limits(memory_bytes=3 * 4 * 56 * 56))
    server = Server(service)
    driver = start_browser()
    messages = lambda d: d.find_element(By.ID, "messages").text
    try:
        model.gate.clear()
        driver.get(server.url)
        driver.find_element(By.ID, "files").send_keys(
            "\n".join(str(images / n) for n in ("wide.png", "tall.jpg")))
        driver.find_element(By.ID, "run").click()
        wait(driver, lambda d: d.find_element(By.ID, "cancel").is_displayed(), "cancel button")
        driver.find_element(By.ID, "cancel").click()
        model.gate.set()
        wait(driver, lambda d: "the job was cancelled" in messages(d), "the cancel message")

        upload(driver, server.url, [images / "wide.png", images / "tall.jpg"])
        other = Client(server.url)
        model.gate.clear()  # the other user's job holds its room while it waits
        status, body = other.json("/api/jobs", form=[("kind", "inspect"),
                                                     ("images", images / "wide.png"),
                                                     ("images", images / "deep.tif")])
        assert status == 200
        wait(driver, lambda d: "has expired" in messages(d), "the expired job's message", 20)
        assert "run it again" in messages(driver)
        model.gate.set()
    finally:
        driver.quit()
        server.stop()


@pytest.mark.browser
def test_bad_input_on_the_page(served, images):
    driver = start_browser()
    try:
        from selenium.webdriver.common.by import By
        driver.get(served[0].url)
        driver.find_element(By.ID, "run").click()  # nothing chosen
        wait(driver, lambda d: "no images given" in d.find_element(By.ID, "messages").text,
             "the empty-upload message")
        driver.find_element(By.ID, "files").send_keys(
            "\n".join(str(images / n) for n in ("notes.txt", "deep.tif")))
        driver.find_element(By.ID, "run").click()
        wait(driver, lambda d: "skipped notes.txt: cannot read it" in d.find_element(
            By.ID, "messages").text, "the non-image message")
        text = driver.find_element(By.ID, "messages").text
        assert "cannot read it (cannot read it" not in text and "/tmp" not in text
        wait(driver, lambda d: [r["name"] for r in rows(d)] == ["deep.tif"], "the one row")
    finally:
        driver.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Drive a running inspection page and save "
                                            "screenshots (the README's)")
    p.add_argument("--url", default="http://127.0.0.1:7860")
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--steps", type=int, default=-100, help="arrow-key presses on the slider")
    p.add_argument("--normal", nargs="*", default=[], help="also calibrate on these")
    p.add_argument("--defective", nargs="*", default=[])
    p.add_argument("--false_alarm_rate", default="0.01")
    p.add_argument("--out", default="figures")
    args = p.parse_args(argv)
    driver = start_browser()
    try:
        drive(driver, args.url, [Path(i).resolve() for i in args.images],
              lambda d: args.steps, out=args.out)
        if args.normal:
            print(calibrate_on_page(driver, [Path(i).resolve() for i in args.normal],
                                    [Path(i).resolve() for i in args.defective],
                                    args.false_alarm_rate, out=args.out))
    finally:
        driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
