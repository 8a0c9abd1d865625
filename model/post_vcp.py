"""Post-VCP (docs/reproduction.md §5): cross-attention from the text embeddings to the image's
patch tokens."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .clip import ConfigError

__all__ = ["PostVCP"]


class PostVCP(nn.Module):
    """Refine text [B,S,T] with L2-normalized patch tokens [B,L,W] -> normalized [B,S,W].

    The projections are 1x1 ``Conv1d`` in the released checkpoints (weights [out, in, 1]); they
    are applied here as the linear maps they are. Scores are q.k with **no** 1/sqrt(d) factor.
    """

    def __init__(self, text_width: int, vision_width: int, heads: int = 8):
        super().__init__()
        if vision_width % heads:
            raise ConfigError(f"vision width {vision_width} is not divisible by {heads} heads")
        self.heads = heads
        self.prompt_temp_l1 = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.q_proj_pre = nn.Conv1d(text_width, vision_width, 1)
        self.k_proj_pre_1 = nn.Conv1d(vision_width, vision_width, 1)
        self.v_proj_pre_1 = nn.Conv1d(vision_width, vision_width, 1)
        self.proj_post_t = nn.Conv1d(vision_width, vision_width, 1)

    @staticmethod
    def _project(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, conv.weight.squeeze(-1), conv.bias)  # [B, N, in] -> [B, N, out]

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        return x.view(b, n, self.heads, w // self.heads).transpose(1, 2)  # [B, h, N, W/h]

    def forward(self, text: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        q = self._split(self._project(self.q_proj_pre, text))  # [B, h, S, d]
        k = self._split(self._project(self.k_proj_pre_1, patches))  # [B, h, L, d]
        v = self._split(self._project(self.v_proj_pre_1, patches))  # [B, h, L, d]
        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)  # softmax over the L patches
        out = out.transpose(1, 2).flatten(2)  # [B, S, W]
        return F.normalize(self._project(self.proj_post_t, out), dim=-1)
