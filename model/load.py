"""Build the fp32 CLIP backbone from OpenAI weights, at any resolution (docs/reproduction.md §1).

The checkpoint is the config: the architecture is read off the tensors' shapes. A TorchScript
archive (OpenAI's ``ViT-L-14-336px.pt``) and a plain state-dict file both load.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from .clip import CLIP, CLIPConfig
from .errors import InputError

__all__ = ["WeightsError", "read_clip_state_dict", "infer_config", "resize_positional_embedding",
           "load_clip"]

NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
OFFICIAL = ("OpenAI's ViT-L-14-336px.pt (the file that the `clip` package's "
            "clip.load('ViT-L/14@336px') downloads; see README, 'Weights')")


class WeightsError(InputError, ValueError):
    """Weights that are missing, unreadable or of the wrong architecture."""


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an OpenAI TorchScript archive or of a ``torch.save``d state dict, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"CLIP weights not found at {path}: expected {OFFICIAL}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:  # not TorchScript: a plain state dict, as OpenAI's loader falls back to
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot read CLIP weights {path} ({type(e).__name__}): expected "
                               f"{OFFICIAL} or a state-dict file") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or "visual.conv1.weight" not in state:
        raise WeightsError(f"{path} holds no CLIP ViT state dict (no 'visual.conv1.weight'): "
                           f"expected {OFFICIAL}")
    return {k: v for k, v in state.items() if k not in NOT_WEIGHTS}


def infer_config(state: dict[str, torch.Tensor]) -> CLIPConfig:
    """The architecture, from the tensors' shapes alone (as OpenAI's ``build_model``)."""
    conv = state["visual.conv1.weight"]  # [W, 3, P, P]
    grid = round(math.sqrt(state["visual.positional_embedding"].shape[0] - 1))
    text_width = state["ln_final.weight"].shape[0]
    text_blocks = {k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")}
    return CLIPConfig(
        embed_dim=state["text_projection"].shape[1],
        image_size=grid * conv.shape[-1],
        vision_layers=sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight")
                          for k in state),
        vision_width=conv.shape[0],
        patch_size=conv.shape[-1],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=len(text_blocks),
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0])


def resize_positional_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1+G*G, W] -> [1+grid*grid, W]: class row kept, the G x G grid resized bicubically with
    antialias=True, align_corners=False (the reference's call)."""
    cls, patches = pos[:1], pos[1:]
    old = round(math.sqrt(patches.shape[0]))
    if old == grid:
        return pos
    image = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, W, G, G]
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True,
                          align_corners=False)
    return torch.cat([cls, image.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def load_clip(weights: str | Path | dict, image_size: int, activation: str = "gelu",
              expected: CLIPConfig | None = None) -> CLIP:
    """An fp32 :class:`CLIP` running at ``image_size``, with one zero row appended to the token
    table for ``<|class|>`` (id 49408). ``expected`` (from ``--config_path``) must agree with
    the weights."""
    state = read_clip_state_dict(weights) if not isinstance(weights, dict) else dict(weights)
    state = {k: v.float() for k, v in state.items()}
    cfg = infer_config(state)
    if expected is not None and cfg != expected:
        raise WeightsError("the config does not match the CLIP weights (config vs weights): "
                           + "; ".join(expected.differences(cfg)))
    if image_size % cfg.patch_size:
        raise WeightsError(f"image size {image_size} is not a multiple of the patch size "
                           f"{cfg.patch_size}")
    state["visual.positional_embedding"] = resize_positional_embedding(
        state["visual.positional_embedding"], image_size // cfg.patch_size)
    tokens = state["token_embedding.weight"]
    state["token_embedding.weight"] = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[1])])
    model = CLIP(cfg, image_size, activation, vocab_size=cfg.vocab_size + 1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"CLIP weights do not fit the architecture: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    return model.eval()
