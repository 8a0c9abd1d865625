"""Where the project's files are by default: the repository's folders and the reference's paths
(docs/reproduction.md §11). Relative defaults are read from the working directory, as the
reference's scripts read them."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"  # backbone configs, <name>.json
DEFAULT_MODEL = "ViT-L-14-336"  # the backbone when nothing says otherwise
DEFAULT_CLIP = "./pretrained_weight/ViT-L-14-336px.pt"
DEFAULT_CHECKPOINT = "./vcp_weight/train_visa.pth"  # trained on VisA, for testing on MVTec-AD
DEFAULT_DATA = "./dataset/mvisa/data"  # the standardized datasets and their meta files


def in_repository(path: str | Path) -> Path:
    """``path`` as given, or under the repository when it is relative, missing here and there."""
    path = Path(path)
    if not path.is_absolute() and not path.exists() and (ROOT / path).exists():
        return ROOT / path
    return path
