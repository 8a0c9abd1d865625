"""Shared fixtures: a tiny random CLIP written as an OpenAI TorchScript archive, and its configs."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import CLIPConfig, VCPConfig  # noqa: E402
from utils.random_clip import write_openai_archive  # noqa: E402

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
