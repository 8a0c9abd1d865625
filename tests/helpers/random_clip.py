"""A randomly initialised CLIP written exactly as OpenAI ships theirs: a TorchScript archive whose
``state_dict()`` has OpenAI's key names, fp16 tensors, and the ``input_resolution``,
``context_length`` and ``vocab_size`` entries. Used by the tests, the demo and the benchmarks,
since the real ``ViT-L-14-336px.pt`` cannot be downloaded everywhere."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from model.clip import CLIP, CLIPConfig

__all__ = ["random_clip_state_dict", "write_openai_archive", "write_archive"]


def random_clip_state_dict(cfg: CLIPConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """OpenAI-named fp16 tensors of a freshly initialised CLIP of architecture ``cfg``."""
    torch.manual_seed(seed)
    model = CLIP(cfg, cfg.image_size)
    return {k: v.detach().half() for k, v in model.state_dict().items()}


class _Node(nn.Module):
    """An empty module: the archive only has to carry parameters under the right names."""


def write_openai_archive(cfg: CLIPConfig, path: str | Path, seed: int = 0) -> Path:
    return write_archive(random_clip_state_dict(cfg, seed), cfg, path)


def write_archive(state: dict[str, torch.Tensor], cfg: CLIPConfig, path: str | Path) -> Path:
    """OpenAI-named tensors (their dtype kept) of architecture ``cfg`` as a TorchScript archive
    laid out as OpenAI's."""
    root = _Node()
    for key, tensor in state.items():
        *parents, name = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
    for name, value in (("input_resolution", cfg.image_size),
                        ("context_length", cfg.context_length), ("vocab_size", cfg.vocab_size)):
        root.register_buffer(name, torch.tensor(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, not gone
        torch.jit.script(root).save(str(path))
    return path
