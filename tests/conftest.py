"""Shared fixtures: a tiny random CLIP written as an OpenAI TorchScript archive and as a
transformers checkpoint, and its configs."""
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


def transformers_clip(hidden_act: str = "gelu", seed: int = 0, vision: dict | None = None):
    """A random ``transformers.CLIPModel`` of the tiny backbone's architecture (configs/tiny.json;
    ``vision`` overrides entries of its vision config), every parameter jittered so that no bias
    or LayerNorm keeps its initial value."""
    import transformers

    tiny = CLIPConfig.from_json(TINY_CONFIG)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=tiny.vocab_size, hidden_size=tiny.text_width,
                         intermediate_size=4 * tiny.text_width, num_hidden_layers=tiny.text_layers,
                         num_attention_heads=tiny.text_heads,
                         max_position_embeddings=tiny.context_length, hidden_act=hidden_act,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config={**dict(hidden_size=tiny.vision_width,
                              intermediate_size=4 * tiny.vision_width,
                              num_hidden_layers=tiny.vision_layers,
                              num_attention_heads=tiny.vision_heads, image_size=tiny.image_size,
                              patch_size=tiny.patch_size, hidden_act=hidden_act), **(vision or {})},
        projection_dim=tiny.embed_dim)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory) -> Path:
    """A transformers checkpoint folder (config.json + model.safetensors) of the tiny backbone,
    its config saying ``hidden_act: quick_gelu`` as OpenAI's CLIPs on the hub do."""
    folder = tmp_path_factory.mktemp("hf") / "clip-tiny"
    transformers_clip("quick_gelu").save_pretrained(folder, safe_serialization=True)
    return folder


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
