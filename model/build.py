"""The one builder every script uses: CLIP weights (+ VCP checkpoint) -> a ready VCPCLIP."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import checkpoint_configs, load_vcp_weights, read_checkpoint
from .clip import CLIPConfig
from .load import WeightsError, load_clip
from .vcp_clip import VCPCLIP, VCPConfig

__all__ = ["build_vcp_clip"]


def build_vcp_clip(clip_weights: str | Path | dict, cfg: VCPConfig,
                   checkpoint: str | Path | dict | None = None,
                   clip_config: CLIPConfig | None = None, source: str = "") -> VCPCLIP:
    """Load the backbone (fp32, at ``cfg.image_size``), add the VCP modules, and load VCP weights
    from ``checkpoint`` if given. A checkpoint is read (and checked) before the backbone, so a
    bad path fails fast. If the checkpoint carries the CLIP config it was trained with, the
    backbone must match it. ``source`` names an already-read checkpoint dict in messages."""
    if isinstance(checkpoint, (str, Path)):
        source, checkpoint = str(checkpoint), read_checkpoint(checkpoint)
    saved_clip = checkpoint_configs(checkpoint)[1] if checkpoint is not None else None
    clip = load_clip(clip_weights, cfg.image_size, cfg.activation, expected=clip_config)
    if saved_clip is not None and saved_clip != clip.cfg:
        name = source or "(given as a dict)"
        raise WeightsError(f"checkpoint {name} was trained on another CLIP backbone (checkpoint "
                           "vs weights): " + "; ".join(saved_clip.differences(clip.cfg)))
    model = VCPCLIP(clip, cfg)
    if checkpoint is not None:
        load_vcp_weights(model, checkpoint, source=source)
    return model.eval()
