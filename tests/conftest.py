"""Shared fixtures: a tiny random CLIP written as an OpenAI TorchScript archive, and its configs."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import CLIPConfig, VCPConfig  # noqa: E402
from helpers.random_clip import write_openai_archive  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "tiny.json"


@pytest.fixture(scope="session")
def tiny_cfg() -> CLIPConfig:
    return CLIPConfig.from_json(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, tiny_cfg) -> Path:
    return write_openai_archive(tiny_cfg, tmp_path_factory.mktemp("clip") / "tiny.pt", seed=0)


@pytest.fixture(scope="session")
def tiny_vcp_cfg() -> VCPConfig:
    """4 tapped layers of the 4-layer tiny backbone, 3 deep-prompted text blocks, 56 px images."""
    return VCPConfig(features_list=(1, 2, 3, 4), image_size=56, total_d_layer_len=3)


def make_folder_source(src: Path, products: dict[str, tuple[int, int]], size: int = 64,
                       seed: int = 0) -> Path:
    """A plain-folder source (``<product>/{good,anomaly,masks}``): smooth random textures per
    product; anomalies are bright square stains with exact 0/255 masks."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for p, (n_good, n_bad) in products.items():
        base = rng.integers(40, 200, 3)
        for sub in ("good", "anomaly", "masks"):
            (src / p / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n_good + n_bad):
            img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
            if i < n_good:
                Image.fromarray(img).save(src / p / "good" / f"{i:03d}.png")
                continue
            mask = np.zeros((size, size), np.uint8)
            y, x = rng.integers(4, size - 20, 2)
            mask[y:y + 14, x:x + 14] = 255
            img[mask > 0] = (250, 30, 30)
            Image.fromarray(img).save(src / p / "anomaly" / f"{i:03d}.png")
            Image.fromarray(mask).save(src / p / "masks" / f"{i:03d}.png")
    return src


def make_dataset(root: Path, name: str, products: dict[str, tuple[int, int]], seed: int = 0):
    """Standardized dataset + meta file, through the real conversion path."""
    from dataset.make_dataset_new import convert
    from dataset.make_meta import write_meta

    src = make_folder_source(root.parent / f"src_{name}", products, seed=seed)
    convert(name, src, root, layout="folder", progress=False)
    write_meta(root, name)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """Data root with meta_toy.json: 2 products, 3 normal + 3 anomalous test images each."""
    root = tmp_path_factory.mktemp("data") / "root"
    return make_dataset(root, "toy", {"cube": (3, 3), "disc": (3, 3)})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_archive, tiny_vcp_cfg) -> Path:
    """A VCP checkpoint of ours (random weights) for the tiny backbone."""
    from model import VCPCLIP, load_clip, save_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ck") / "tiny_vcp.pth"
    save_checkpoint(VCPCLIP(load_clip(tiny_archive, 56), tiny_vcp_cfg), path)
    return path
