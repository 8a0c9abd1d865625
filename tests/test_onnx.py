"""export.py: the ONNX graph computes the PyTorch maps (dynamic batch, two image sizes, fp16),
its JSON says what a reader needs; predict.py --onnx writes what the PyTorch path writes; bad
flags and files are one-line errors."""
import csv
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import app
import export
import predict
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from utils.data.dataset import CLIP_MEAN, CLIP_STD
from utils.cli import predictor_of
from utils.inference.prediction import Prediction


pytestmark = [pytest.mark.slow]


def run_export(archive, checkpoint, *flags) -> int:
    return export.main(["--checkpoint_path", str(checkpoint), "--pretrained_path", str(archive),
                        *map(str, flags)])


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_archive, tiny_checkpoint):
    """(size, precision) -> the .onnx path of the tiny checkpoint exported that way."""
    out = tmp_path_factory.mktemp("onnx")
    paths = {}
    for size, precision in ((56, "fp32"), (42, "fp32"), (42, "fp16")):
        path = out / f"tiny_{size}_{precision}.onnx"
        assert run_export(tiny_archive, tiny_checkpoint, "--image_size", size,
                          "--precision", precision, "--output", path) == 0
        paths[size, precision] = path
    return paths


def torch_maps(archive, checkpoint, size, images):
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    cfg = type(cfg)(**{**cfg.to_dict(), "image_size": size})
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint)
    with torch.inference_mode():
        return [m.numpy() for m in model(images).abnormal()]


@pytest.mark.parametrize("size", [56, 42])
def test_onnx_maps_equal_pytorch_maps(exported, tiny_archive, tiny_checkpoint, size):
    session = ort.InferenceSession(str(exported[size, "fp32"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["raw", "new"]
    for batch in (1, 2, 3, 5):
        images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        raw, new = session.run(None, {"images": images.numpy()})
        want_raw, want_new = torch_maps(tiny_archive, tiny_checkpoint, size, images)
        assert raw.shape == new.shape == (batch, size, size) and raw.dtype == np.float32
        assert np.abs(raw - want_raw).max() < 1e-4 and np.abs(new - want_new).max() < 1e-4


def test_fp16_export_is_close_and_half_the_size(exported, tiny_archive, tiny_checkpoint):
    fp16, fp32 = exported[42, "fp16"], exported[42, "fp32"]
    session = ort.InferenceSession(str(fp16), providers=["CPUExecutionProvider"])
    images = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(0))
    got = session.run(None, {"images": images.numpy()})
    want = torch_maps(tiny_archive, tiny_checkpoint, 42, images)
    diffs = [np.abs(g - w).max() for g, w in zip(got, want)]
    assert 0 < max(diffs) < 5e-3  # really computed in fp16, and close
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    meta = json.loads(fp16.with_suffix(".json").read_text())
    assert meta["precision"] == "fp16" and max(meta["check_max_abs_diff"].values()) < 5e-3


def test_graph_holds_only_the_template_rows_of_the_token_table(exported, tiny_cfg):
    """The maps above equal the whole model's; the graph carries no [vocabulary, width] table."""
    import onnx
    graph = onnx.load(str(exported[56, "fp32"])).graph
    shapes = [tuple(init.dims) for init in graph.initializer]
    assert (tiny_cfg.vocab_size + 1, tiny_cfg.text_width) not in shapes  # <|class|> appended
    assert max(dims[0] for dims in shapes if dims) < 1000


def test_sidecar_says_what_a_reader_needs(exported, tiny_checkpoint, tiny_cfg):
    path = exported[56, "fp32"]
    meta = json.loads(path.with_suffix(".json").read_text())
    saved = checkpoint_configs(read_checkpoint(tiny_checkpoint))[0]
    assert meta["onnx"] == path.name and meta["external_data"] is None
    assert meta["input"]["image_size"] == 56 and meta["input"]["shape"] == ["batch", 3, 56, 56]
    assert meta["input"]["mean"] == list(CLIP_MEAN) and meta["input"]["std"] == list(CLIP_STD)
    assert meta["vcp_config"] == json.loads(json.dumps(saved.to_dict()))
    assert meta["clip_config"] == tiny_cfg.to_json_dict()
    assert meta["checkpoint"] == str(tiny_checkpoint.resolve())
    assert meta["opset"] >= 17 and meta["precision"] == "fp32"
    assert max(meta["check_max_abs_diff"].values()) < 1e-4
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("flags, message", [
    (["--output", "model.pt"], "--output model.pt: expected a file name ending in .onnx"),
    (["--precision", "bf16"], "--precision bf16: export supports"),
])
def test_bad_flags_are_one_line_errors(tmp_path, tiny_archive, tiny_checkpoint, capsys, flags,
                                       message):
    flags = ["--output", tmp_path / "m.onnx", *flags]
    assert run_export(tiny_archive, tiny_checkpoint, *flags) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "m.onnx").exists()


def test_missing_checkpoint_or_output_folder_is_an_error(tmp_path, tiny_archive, tiny_checkpoint,
                                                         capsys):
    assert run_export(tiny_archive, tmp_path / "none.pth",
                      "--output", tmp_path / "m.onnx") == 2
    assert "none.pth" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    bad_output = tmp_path / "a_file" / "m.onnx"
    assert run_export(tiny_archive, tiny_checkpoint, "--output", bad_output) == 2
    assert "--output" in capsys.readouterr().err and not list(tmp_path.glob("**/*.onnx"))


def run_predict(out, *inputs_and_flags) -> int:
    return predict.main([*map(str, inputs_and_flags), "--save_path", str(out), "--save_maps",
                         "--num_workers", "0", "--batch_size", "2", "--threshold", "0.5"])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i, shape in enumerate([(40, 60, 3), (56, 56, 3), (33, 47, 3)]):
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(d / f"p{i}.png")
    (d / "p3_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return d


def test_predict_onnx_writes_what_the_pytorch_path_writes(tmp_path, exported, photos,
                                                          tiny_archive, tiny_checkpoint):
    assert run_predict(tmp_path / "torch", photos, "--checkpoint_path", tiny_checkpoint,
                       "--pretrained_path", tiny_archive, "--device", "cpu") == 0
    assert run_predict(tmp_path / "onnx", photos, "--onnx", exported[56, "fp32"],
                       "--checkpoint_path", tmp_path / "never_read.pth", "--device", "cpu") == 0
    rows = {}
    for how in ("torch", "onnx"):
        with open(tmp_path / how / "scores.csv") as f:
            rows[how] = list(csv.DictReader(f))
    assert [r["path"] for r in rows["onnx"]] == [r["path"] for r in rows["torch"]]
    assert len(rows["onnx"]) == 3
    for a, b in zip(rows["torch"], rows["onnx"]):
        for key in ("image_score", "max_pixel_score"):
            assert abs(float(a[key]) - float(b[key])) < 1e-4
    for sub in ("overlays", "masks", "maps"):
        assert sorted(p.name for p in (tmp_path / "torch" / sub).iterdir()) == \
            sorted(p.name for p in (tmp_path / "onnx" / sub).iterdir())
    for npy in (tmp_path / "torch" / "maps").iterdir():
        assert np.abs(np.load(npy) - np.load(tmp_path / "onnx" / "maps" / npy.name)).max() < 1e-4


def test_predict_onnx_bad_inputs_are_one_line_errors(tmp_path, exported, photos, capsys):
    good = exported[56, "fp32"]
    not_onnx = tmp_path / "fake.onnx"
    not_onnx.write_bytes(b"this is no protobuf")
    shutil.copy(good.with_suffix(".json"), not_onnx.with_suffix(".json"))
    no_json = tmp_path / "alone.onnx"
    shutil.copy(good, no_json)
    other_size = tmp_path / "other.onnx"
    shutil.copy(good, other_size)
    meta = json.loads(good.with_suffix(".json").read_text())
    meta["input"]["image_size"] = 42
    other_size.with_suffix(".json").write_text(json.dumps(meta))
    cases = [
        (["--onnx", tmp_path / "missing.onnx"], "missing.onnx does not exist"),
        (["--onnx", not_onnx], "fake.onnx is not a readable ONNX model"),
        (["--onnx", no_json], "alone.json is missing"),
        (["--onnx", other_size], "expected input images [B,3,42,42]"),
        (["--onnx", good, "--image_size", "42"], "--image_size cannot be used with --onnx"),
        (["--onnx", good, "--device", "gpu"], "--device gpu: with an ONNX model, expected cpu, cuda"),
    ]
    for flags, message in cases:
        assert run_predict(tmp_path / "out", photos / "p0.png", *flags) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_the_page_takes_an_exported_model_too(exported, photos):
    args = app.parse_args(["--onnx", str(exported[56, "fp32"]), "--device", "cpu"])
    results = list(predictor_of(args)(sorted(photos.glob("p[0-2].png"))))
    assert len(results) == 3 and all(isinstance(r, Prediction) for r in results)
    assert all(r.amap.shape == (56, 56) for r in results)


def test_tiled_maps_of_onnx_runtime_equal_pytorch_maps(exported, photos, tiny_archive,
                                                     tiny_checkpoint):
    """Tiling wraps the runtime seam: the stitched maps of the exported graph are PyTorch's."""
    import torch
    from utils.inference.onnx_runtime import OnnxRuntime
    from utils.inference.prediction import Predictor
    from utils.inference.runtime import ModelSource, TorchRuntime
    from utils.inference.tiling import Tiling
    paths = sorted(photos.glob("p[0-2].png"))  # 60x40, 56x56, 47x33
    runtimes = [OnnxRuntime(exported[56, "fp32"], "cpu", 0),
                TorchRuntime.load(ModelSource(str(tiny_checkpoint), str(tiny_archive)),
                                  torch.device("cpu"))]
    onnx, torch_ = ([r for r in Predictor(rt, batch_size=3, tiling=Tiling(24, 0.3))(paths)]
                    for rt in runtimes)
    assert [r.tiles for r in onnx] == [r.tiles for r in torch_] and onnx[0].tiles > 1
    for a, b in zip(onnx, torch_):
        assert a.amap.shape == b.amap.shape != (56, 56)
        assert np.abs(a.amap - b.amap).max() < 1e-4 and abs(a.image_score - b.image_score) < 1e-4


@pytest.mark.parametrize("device,device_id,available,expected", [
    (None, 3, ["CPUExecutionProvider"], ["CPUExecutionProvider"]),
    (None, 3, ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"]),
    ("cpu", 0, ["CUDAExecutionProvider", "CPUExecutionProvider"], ["CPUExecutionProvider"]),
    ("cuda:1", 0, ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"]),
    ("cuda", 2, ["CUDAExecutionProvider", "CPUExecutionProvider"],
     [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]),
    ("cuda", 0, ["CPUExecutionProvider"], "has no CUDA provider"),
    ("gpu", 0, ["CPUExecutionProvider"], "expected cpu, cuda or cuda:N"),
    ("cuda:x", 0, ["CUDAExecutionProvider"], "expected cpu, cuda or cuda:N"),
    ("mps", 0, ["CPUExecutionProvider"], "expected cpu, cuda or cuda:N"),
])
def test_device_names_the_onnx_runtime_provider(device, device_id, available, expected):
    from types import SimpleNamespace

    from utils.errors import UsageError
    from utils.inference.onnx_runtime import _onnx_providers
    fake = SimpleNamespace(get_available_providers=lambda: available)
    if isinstance(expected, str):
        with pytest.raises(UsageError, match=expected):
            _onnx_providers(fake, device, device_id)
    else:
        assert _onnx_providers(fake, device, device_id) == expected
