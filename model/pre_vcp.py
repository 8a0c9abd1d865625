"""Pre-VCP (docs/reproduction.md §4): the image's global feature becomes the class tokens of the
text prompt,
so no product name is needed."""
from __future__ import annotations

import math

import torch
from torch import nn

from .clip import ConfigError

__all__ = ["PreVCP"]


class _Conv(nn.Module):
    """Holds the conv under the name ``fc`` so the state dict reads ``prompt_linear1.fc.*``."""

    def __init__(self, prompt_len: int):
        super().__init__()
        self.fc = nn.Conv1d(1, prompt_len, kernel_size=3, padding="same")


class PreVCP(nn.Module):
    """C = prompt_query + Conv1d(1 -> r, k=3)(image_features) -> class tokens [B, r, T].

    ``prompt_temp`` is the temperature of the linear ("raw") branch; it lives here because the
    released checkpoints keep it in this group (``New_Lan_Embed``).
    """

    def __init__(self, prompt_len: int, width: int, embed_dim: int, use_global: bool = True):
        super().__init__()
        if use_global and width != embed_dim:
            raise ConfigError(f"Pre-VCP needs text width == embed dim, got {width} and {embed_dim}")
        self.use_global = use_global
        self.prompt_query = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, prompt_len, width), std=1.0, a=-2.0, b=2.0))
        self.prompt_temp = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.prompt_linear1 = _Conv(prompt_len)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        b = image_features.shape[0]  # image_features [B, E]
        if not self.use_global:  # `--use_global` switched off: fixed learnable class tokens
            return self.prompt_query.expand(b, -1, -1)
        context = self.prompt_linear1.fc(image_features.reshape(b, 1, -1))  # [B, r, E]
        return self.prompt_query + context  # [B, r, T]
