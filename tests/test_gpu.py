"""The model and test.py on a CUDA device against the CPU (skipped without one; bench/gpu_suite.py
runs them on a GPU, docs/performance.md)."""
import json
import math

import pytest
import torch

import test as test_script
from model import VCPCLIP, load_clip
from utils.device import autocast

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model_and_images(tiny_archive, tiny_vcp_cfg):
    """The tiny VCP-CLIP (random VCP parts, eval mode) on the CPU and 4 random images."""
    torch.manual_seed(0)
    model = VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg).eval()
    return model, torch.randn(4, 3, 56, 56)


def maps_on(model, images, device, precision):
    """(raw, new) [4,56,56] float32 on the CPU, the model run on ``device`` in ``precision``."""
    model = model.to(device)
    try:
        with torch.inference_mode(), autocast(device, precision):
            return [m.float().cpu() for m in model(images.to(device)).abnormal()]
    finally:
        model.cpu()


def test_fp32_maps_on_cuda_equal_the_cpu(model_and_images):
    """Same weights, same images: only the kernels' summation order differs (TF32 off, which
    cuDNN's convolutions use by default)."""
    model, images = model_and_images
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            cpu, cuda = (maps_on(model, images, d, "fp32") for d in (torch.device("cpu"), CUDA))
    finally:
        torch.set_float32_matmul_precision(matmul)
    for a, b in zip(cpu, cuda):
        assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_fp16_autocast_maps_on_cuda_are_close_to_fp32_on_the_cpu(model_and_images):
    """test.py's default on a GPU. The tolerance is 3x what fp16 autocast on the CPU changes in
    these maps (6.6e-4); ViT-L/14@336 on an H100 changed them by 1.8e-4 (docs/performance.md)."""
    model, images = model_and_images
    cpu, cuda = (maps_on(model, images, d, p) for d, p in ((torch.device("cpu"), "fp32"),
                                                           (CUDA, "fp16")))
    for a, b in zip(cpu, cuda):
        assert torch.isfinite(b).all()
        assert (a - b).abs().max().item() <= 2e-3


def test_test_script_runs_on_cuda(tmp_path, tiny_data, tiny_archive, tiny_checkpoint):
    """test.py end to end on the GPU (fp16, pinned memory): the table of both products, every
    metric in [0, 1], one panel per test image."""
    out = tmp_path / "out"
    code = test_script.main(["--data_path", str(tiny_data), "--dataset", "toy",
                             "--checkpoint_path", str(tiny_checkpoint), "--pretrained_path",
                             str(tiny_archive), "--model", "tiny", "--save_path", str(out),
                             "--device", "cuda", "--num_workers", "0", "--batch_size", "4"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["products"]) == {"cube", "disc"}
    values = [v for row in metrics["products"].values() for v in row.values()
              if isinstance(v, float)]
    assert values and all(0 <= v <= 1 for v in values if not math.isnan(v))
    assert len(list((out / "imgs").rglob("*.png"))) == 12
