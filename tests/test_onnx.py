"""export.py: the ONNX graph computes the PyTorch maps (dynamic batch, two image sizes, fp16),
its JSON says what a reader needs, and bad flags are one-line errors."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import export
from model import build_vcp_clip, checkpoint_configs, read_checkpoint
from utils.data import CLIP_MEAN, CLIP_STD


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


def test_missing_checkpoint_is_an_error(tmp_path, tiny_archive, capsys):
    assert run_export(tiny_archive, tmp_path / "none.pth",
                      "--output", tmp_path / "m.onnx") == 2
    assert "none.pth" in capsys.readouterr().err
