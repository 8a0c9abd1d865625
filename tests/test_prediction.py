"""utils/inference/prediction.py and utils/inference/outputs.py: the prediction service, driven by a runtime that is not
the model."""
import csv

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter

from utils.data.dataset import image_transform
from utils.data.images import read_rgb
from utils.inference.outputs import OutputWriter, binary_mask, full_size
from utils.inference.prediction import Prediction, Predictor, Skipped
from utils.inference.runtime import RuntimeOutput


class RampRuntime:
    """A stand-in runtime: raw = a horizontal ramp, new = the mean of the first channel."""

    image_size, has_features = 32, False

    def __call__(self, images):
        b, _, s, _ = images.shape
        raw = np.broadcast_to(np.linspace(0, 1, s, dtype=np.float32), (b, s, s)).copy()
        new = np.broadcast_to(images[:, 0].mean((1, 2)).numpy()[:, None, None], (b, s, s))
        return RuntimeOutput(raw, new.astype(np.float32))


def test_any_runtime_order_skips_and_outputs(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for name in ("x.png", "bad.png", "y.jpg"):
        paths.append(tmp_path / name)
        if name == "bad.png":
            paths[-1].write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(paths[-1])
    results = list(Predictor(RampRuntime(), batch_size=2)(paths))
    assert [type(r) for r in results] == [Skipped, Prediction, Prediction]
    assert [r.index for r in results] == [1, 0, 2] and "bad.png" in str(results[0].path)
    raw = np.broadcast_to(np.linspace(0, 1, 32, dtype=np.float32), (32, 32))
    for r in results[1:]:
        c = float(image_transform(32)(read_rgb(r.path))[0].mean())  # the constant `new` plane
        assert r.amap.shape == (32, 32) and r.amap.dtype == np.float32
        assert np.abs(r.amap - (gaussian_filter(0.2 * raw, sigma=8) + 0.8 * c)).max() < 1e-5
        assert r.image_score == pytest.approx(raw.mean() + c, abs=1e-5)  # 1024 px < top 2000
    out = tmp_path / "out"
    writer = OutputWriter(out, threshold=0.1, save_maps=True)
    for r in results[1:]:
        writer.write(r.path.stem, r)
    writer.write_scores([r.row() for r in results[1:]])
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(paths[0]), str(paths[2])]
    for r in results[1:]:
        mask = np.asarray(Image.open(out / "masks" / f"{r.path.stem}.png"))
        assert mask.shape == (30, 50)
        assert np.array_equal(mask, binary_mask(full_size(r.amap, (50, 30)), 0.1))
        assert np.array_equal(np.load(out / "maps" / f"{r.path.stem}.npy"), r.amap)
    assert not list(out.rglob("*.tmp"))


def test_binary_mask_is_strictly_above_threshold():
    m = np.array([[0.2, 0.5], [0.50001, 0.9]], dtype=np.float32)
    assert binary_mask(m, 0.5).tolist() == [[0, 0], [255, 255]]
