"""Build the fp32 CLIP backbone from CLIP weights, at any resolution (docs/reproduction.md §1).

The checkpoint is the config: the architecture is read off the tensors' shapes. A file is told by
its content, never by its name: a safetensors file (read without unpickling anything), a
TorchScript archive (OpenAI's ``ViT-L-14-336px.pt``) or a ``torch.save`` file (weights only),
holding OpenAI's, open_clip's or transformers' key names (``model/layouts.py``); a transformers
folder's ``config.json`` must agree with its tensors. The files accepted: docs/weights.md.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from .clip import CLIP, CLIPConfig
from .layouts import WeightsError, detect_layout, to_openai_names

__all__ = ["WeightsError", "read_clip_state_dict", "infer_config", "resize_positional_embedding",
           "load_clip"]

OFFICIAL = ("OpenAI's ViT-L-14-336px.pt (the file that the `clip` package's "
            "clip.load('ViT-L/14@336px') downloads) or a folder of the hub's "
            "openai/clip-vit-large-patch14-336; see docs/weights.md")
# The weight file read from a folder, first found first: open_clip's file names before
# transformers' ones, since a hub repository of timm's holds open_clip's files beside a
# model.safetensors in timm's own layout.
FOLDER_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")


def weight_file(path: Path) -> Path:
    """``path`` itself, or the weight file of the folder ``path``."""
    if path.is_dir():
        found = [path / name for name in FOLDER_FILES if (path / name).is_file()]
        if not found:
            raise WeightsError(f"{path} is a folder without CLIP weights: expected one of "
                               f"{', '.join(FOLDER_FILES)} in it (see docs/weights.md)")
        return found[0]
    if not path.is_file():
        raise WeightsError(f"CLIP weights not found at {path}: expected {OFFICIAL}")
    return path


def is_safetensors(path: Path) -> bool:
    """A safetensors file starts with its header's length (8 bytes) and the header's ``{``."""
    with path.open("rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_tensors(path: Path) -> dict:
    """Every entry of a weight file, on the CPU, in its own key names; open_clip's
    ``{'state_dict': ...}`` wrapper is opened."""
    if is_safetensors(path):
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # a header or data cut short, or not safetensors after all
            raise WeightsError(f"cannot read CLIP weights {path} (a safetensors file, cut short "
                               f"or damaged: {e})") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except Exception:  # not TorchScript: a plain state dict, as OpenAI's loader falls back to
        try:
            with path.open("rb") as f:  # a file, not a name: torch.load picks a reader by suffix
                state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"cannot read CLIP weights {path} ({type(e).__name__}): expected "
                               f"{OFFICIAL}, or a state-dict file") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a state dict: expected "
                           f"{OFFICIAL}")
    return state


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """OpenAI-named tensors, on the CPU, of any file or folder of docs/weights.md's table. A
    transformers checkpoint with a ``config.json`` beside it is checked against it."""
    file = weight_file(Path(path))
    raw = read_tensors(file)
    layout = detect_layout(raw, str(file))
    config = file.parent / "config.json"
    transformers = layout == "transformers" and config.is_file()
    stated = read_transformers_config(config) if transformers else None
    state = to_openai_names(raw, layout, str(file))
    if stated is not None:
        check_transformers_config(stated, state, config)
    return state


def read_transformers_config(path: Path) -> dict:
    """A transformers ``config.json``, which must describe a CLIP (``model_type`` 'clip')."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}, the transformers config beside the CLIP "
                           f"weights: {e}") from None
    kind = raw.get("model_type", "clip") if isinstance(raw, dict) else None
    if kind != "clip":
        raise WeightsError(f"{path} describes a {kind!r} model, not transformers' CLIP "
                           "(model_type 'clip'): this loader reads CLIP ViTs (see docs/weights.md)")
    return raw


def _stated(raw: dict, key: str):
    """The value of a dotted key of config.json, or None where it does not state one."""
    for part in key.split("."):
        raw = raw.get(part) if isinstance(raw, dict) else None
    return raw


def _mlp_width(state: dict[str, torch.Tensor], tower: str) -> int | None:
    """Rows of the first block's ``mlp.c_fc.weight`` in ``tower`` (a key prefix)."""
    return next((v.shape[0] for k, v in state.items()
                 if k.startswith(tower) and k.endswith("mlp.c_fc.weight")), None)


def sizes_from_tensors(state: dict[str, torch.Tensor]) -> dict[str, int | None]:
    """The sizes a transformers config.json states, as the tensors have them (dotted keys)."""
    cfg = infer_config(state)
    return {
        "projection_dim": cfg.embed_dim, "vision_config.image_size": cfg.image_size,
        "vision_config.patch_size": cfg.patch_size, "vision_config.hidden_size": cfg.vision_width,
        "vision_config.num_hidden_layers": cfg.vision_layers,
        "vision_config.intermediate_size": _mlp_width(state, "visual.transformer."),
        "text_config.hidden_size": cfg.text_width, "text_config.num_hidden_layers": cfg.text_layers,
        "text_config.intermediate_size": _mlp_width(state, "transformer."),
        "text_config.max_position_embeddings": cfg.context_length,
        "text_config.vocab_size": cfg.vocab_size}


def check_transformers_config(raw: dict, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every size that config.json states must be the tensors', and what it asks for must be
    what this CLIP builds (heads of 64 channels, LayerNorm eps 1e-5). Its ``hidden_act`` is not
    read: the activation is the VCP model's setting (``VCPConfig.activation``)."""
    wrong = [f"{k}: {_stated(raw, k)} vs {v}" for k, v in sizes_from_tensors(state).items()
             if _stated(raw, k) is not None and _stated(raw, k) != v]
    if wrong:
        raise WeightsError(f"{path} does not match the CLIP weights beside it (config.json vs "
                           "weights): " + "; ".join(wrong))
    cfg = infer_config(state)
    built = {"vision_config.num_attention_heads": cfg.vision_heads,
             "text_config.num_attention_heads": cfg.text_heads,
             "vision_config.layer_norm_eps": 1e-5, "text_config.layer_norm_eps": 1e-5}
    wrong = [f"{k} {_stated(raw, k)} (this CLIP builds {v})" for k, v in built.items()
             if _stated(raw, k) is not None and _stated(raw, k) != v]
    if wrong:
        raise WeightsError(f"{path}: a CLIP this loader cannot build: " + "; ".join(wrong)
                           + " (heads of 64 channels and LayerNorm eps 1e-5, as OpenAI's)")


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


def _load_into(model: CLIP, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``; a key or shape that does not fit is an error."""
    own = model.state_dict()
    shapes = [f"{k} {list(v.shape)} (needs {list(own[k].shape)})" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes or missing or unexpected:
        raise WeightsError(f"CLIP weights {source} do not fit the architecture read off their "
                           f"shapes: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                           f"shapes {shapes[:5]}")
    model.load_state_dict(state)


def load_clip(weights: str | Path | dict, image_size: int, activation: str = "gelu",
              expected: CLIPConfig | None = None) -> CLIP:
    """An fp32 :class:`CLIP` running at ``image_size``, with one zero row appended to the token
    table for ``<|class|>`` (id 49408). ``weights``: a file or folder of docs/weights.md's
    table, or a state dict in any of its layouts. ``activation`` is the model's (exact GELU for
    VCP-CLIP), never the weight file's. ``expected`` (from ``--config_path``) must agree with
    the weights."""
    if isinstance(weights, dict):
        source = "(a state dict given as a dict)"
        state = to_openai_names(weights, detect_layout(weights, source), source)
    else:
        source, state = str(weights), read_clip_state_dict(weights)
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
    _load_into(model, state, source)
    return model.eval()
