"""The runtime seam: images in, the two abnormal maps (and, where the runtime has them, the
model's other outputs) out. ``TorchRuntime`` runs the PyTorch model;
``utils/inference/onnx_runtime.py`` runs an exported graph on ONNX Runtime; a next runtime
(OpenVINO, TensorRT) is one more class with the same three members.

Also here: where a PyTorch model comes from (``ModelSource``) and the one way it is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from model import (AnomalyMaps, CLIPConfig, VCPConfig, build_vcp_clip, checkpoint_configs,
                   read_checkpoint)
from utils.device import autocast
from utils.errors import UsageError
from utils.paths import CONFIGS, DEFAULT_CLIP, DEFAULT_MODEL, in_repository

__all__ = ["RuntimeOutput", "Runtime", "ModelSource", "read_model", "load_model", "TorchRuntime"]


@dataclass
class RuntimeOutput:
    """What a runtime gives for a batch of B images at S x S."""

    raw: np.ndarray  # [B, S, S] float32: the linear (Pre-VCP) branch's abnormal map
    new: np.ndarray  # [B, S, S] float32: the Post-VCP branch's
    features: AnomalyMaps | None = None  # the PyTorch model's whole output (patch tokens ...)


class Runtime(Protocol):
    image_size: int  # S: the images it takes are [B, 3, S, S], CLIP-normalized
    has_features: bool  # whether its outputs carry ``features`` (what patch scoring reads)

    def __call__(self, images: torch.Tensor) -> RuntimeOutput: ...


@dataclass(frozen=True)
class ModelSource:
    """Where a VCP-CLIP model's weights and shape come from."""

    checkpoint: str | None = None  # VCP weights (None: freshly initialized VCP parts)
    pretrained: str = DEFAULT_CLIP  # CLIP weights
    config_path: str | None = None  # a backbone config JSON that the weights must match
    model: str | None = None  # a backbone name: configs/<model>.json
    overrides: dict = field(default_factory=dict)  # VCPConfig fields set explicitly

    def config(self, saved: VCPConfig | None) -> VCPConfig:
        """Explicit overrides > the checkpoint's saved config > the reference defaults."""
        return VCPConfig(**{**(saved or VCPConfig()).to_dict(), **self.overrides})

    def clip_config(self, payload: dict | None) -> CLIPConfig | None:
        """The backbone the weights must match: ``config_path``, else ``model``, else None when
        the checkpoint carries its own (``build_vcp_clip`` checks that), else the reference's."""
        if self.config_path:
            path, option = Path(self.config_path), "config_path"
        elif self.model or payload is None or checkpoint_configs(payload)[1] is None:
            path, option = CONFIGS / f"{self.model or DEFAULT_MODEL}.json", "model"
        else:
            return None
        if not path.is_file():
            raise UsageError(f"backbone config {path} does not exist", option=option)
        return CLIPConfig.from_json(path)


def read_model(source: ModelSource) -> tuple[dict | None, VCPConfig]:
    """Read (and so check) the checkpoint before any model work; resolve the model config."""
    payload = read_checkpoint(source.checkpoint) if source.checkpoint else None
    saved = checkpoint_configs(payload)[0] if payload is not None else None
    return payload, source.config(saved)


def load_model(source: ModelSource, device: torch.device, payload: dict | None = None,
               cfg: VCPConfig | None = None) -> torch.nn.Module:
    """The one model builder (fp32 weights, eval mode, on ``device``); ``payload`` and ``cfg``
    as ``read_model`` gave them (read here when not given)."""
    if cfg is None:
        payload, cfg = read_model(source)
    model = build_vcp_clip(in_repository(source.pretrained), cfg, checkpoint=payload,
                           clip_config=source.clip_config(payload),
                           source=source.checkpoint or "")
    return model.to(device)


class TorchRuntime:
    """The PyTorch model as a runtime: inference mode, the device's autocast (``precision``)."""

    has_features = True

    def __init__(self, model: torch.nn.Module, device: torch.device,
                 precision: str | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.image_size = model.cfg.image_size

    @classmethod
    def load(cls, source: ModelSource, device: torch.device,
             precision: str | None = None) -> "TorchRuntime":
        return cls(load_model(source, device), device, precision)

    def __call__(self, images: torch.Tensor) -> RuntimeOutput:
        """images [B,3,S,S] -> raw, new [B,S,S] float32 and the model's output."""
        with torch.inference_mode(), autocast(self.device, self.precision):
            maps = self.model(images.to(self.device, non_blocking=True))
            raw, new = maps.abnormal()  # [B, S, S] each
        return RuntimeOutput(raw.float().cpu().numpy(), new.float().cpu().numpy(), maps)
