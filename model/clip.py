"""The CLIP ViT backbone with OpenAI's parameter names, and the prompted text forward of VCP-CLIP.

An OpenAI state dict (``ViT-L-14-336px.pt``) loads into :class:`CLIP` with no renaming; see
``model/load.py``. Everything here is shape-driven by :class:`CLIPConfig`; nothing names a device.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

__all__ = ["ConfigError", "CLIPConfig", "CLIP", "TextPrompts"]


class ConfigError(InputError, ValueError):
    """A model configuration that cannot be built (a config file, a layer index, a size)."""


@dataclass(frozen=True)
class CLIPConfig:
    """The architecture of a CLIP checkpoint (its pretrained resolution, not the run-time one)."""

    embed_dim: int
    image_size: int
    vision_layers: int
    vision_width: int
    patch_size: int
    text_width: int
    text_heads: int
    text_layers: int
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def vision_heads(self) -> int:
        return self.vision_width // 64  # OpenAI's rule for ViTs

    @classmethod
    def from_json_dict(cls, raw: dict) -> "CLIPConfig":
        """The ``--config_path`` format: ``embed_dim``, ``vision_cfg``, ``text_cfg``."""
        vision, text = raw["vision_cfg"], raw["text_cfg"]
        return cls(embed_dim=raw["embed_dim"], image_size=vision["image_size"],
                   vision_layers=vision["layers"], vision_width=vision["width"],
                   patch_size=vision["patch_size"], text_width=text["width"],
                   text_heads=text["heads"], text_layers=text["layers"],
                   context_length=text["context_length"], vocab_size=text["vocab_size"])

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        try:
            return cls.from_json_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError) as e:  # not JSON (or not text), keys missing
            raise ConfigError(f"config file {path} is not a CLIP config "
                              f"(embed_dim, vision_cfg, text_cfg): {e!r}") from None

    def to_json_dict(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.vision_layers,
                               "width": self.vision_width, "patch_size": self.patch_size},
                "text_cfg": {"context_length": self.context_length, "vocab_size": self.vocab_size,
                             "width": self.text_width, "heads": self.text_heads,
                             "layers": self.text_layers}}

    def differences(self, other: "CLIPConfig") -> list[str]:
        """Fields that differ, as 'name: self vs other' lines."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k}: {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as OpenAI's CLIP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": nn.GELU, "quick_gelu": QuickGELU}


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names, through SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape  # [B, N, W]
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, heads, N, d]
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, activation: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("act", ACTIVATIONS[activation]())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, activation)
                                       for _ in range(layers))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig, image_size: int, activation: str):
        super().__init__()
        if image_size % cfg.patch_size:
            raise ConfigError(f"image size {image_size} is not a multiple of the patch size "
                             f"{cfg.patch_size}")
        width, self.grid = cfg.vision_width, image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(
            torch.randn(self.grid ** 2 + 1, width) * width ** -0.5)
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.vision_layers, cfg.vision_heads, activation)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, cfg.embed_dim) * width ** -0.5)

    def forward(self, images: torch.Tensor, features_list: tuple[int, ...]):
        """images [B,3,S,S] -> (image_features [B,E] not normalized, tokens of each tapped block
        (1-based indices) [B,1+L,W], class token first, no ln_post, no projection)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, L, W], patches in row-major order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+L, W]
        x = self.ln_pre(x)
        tapped = []
        for i, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if i in features_list:
                tapped.append(x)
        image_features = self.ln_post(x[:, 0]) @ self.proj  # [B, E]
        return image_features, tapped


class TextPrompts(nn.Module):
    """The learnable text-side prompts of docs/reproduction.md §3 (names as in the released
    checkpoints' top level).

    ``prompt_embeddings`` [1,n,T] go in after the start token; ``deep_prompt_embeddings`` [D,n,T]
    overwrite those n positions before blocks 1..D. ``prompt_text_projection`` is trained by the
    reference but never used in its forward; it is kept so that checkpoints round-trip.
    """

    def __init__(self, n: int, depth: int, width: int, embed_dim: int, dropout: float = 0.1):
        super().__init__()
        self.prompt_embeddings = nn.Parameter(torch.randn(1, n, width) * 0.02)
        self.deep_prompt_embeddings = nn.Parameter(torch.randn(depth, n, width) * 0.02)
        self.prompt_proj = nn.Linear(width, width)
        self.prompt_norm = nn.LayerNorm(width, eps=1e-6)
        self.prompt_dropout = nn.Dropout(dropout)
        self.prompt_text_projection = nn.Parameter(torch.randn(width, embed_dim) * width ** -0.5)

    def project(self, prompt: torch.Tensor, batch: int) -> torch.Tensor:
        """[n,T] -> [batch,n,T], dropout drawn independently for every sequence."""
        return self.prompt_dropout(self.prompt_proj(prompt).expand(batch, -1, -1))


class CLIP(nn.Module):
    """OpenAI's CLIP (vision + text towers). ``vocab_size`` is the token table's row count, which
    is one more than the checkpoint's once ``<|class|>`` is appended (``model/load.py``)."""

    def __init__(self, cfg: CLIPConfig, image_size: int, activation: str = "gelu",
                 vocab_size: int | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                              f"got {activation!r}")
        self.cfg = cfg
        self.visual = VisionTransformer(cfg, image_size, activation)
        width = cfg.text_width
        self.token_embedding = nn.Embedding(vocab_size or cfg.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, width) * 0.01)
        self.transformer = Transformer(width, cfg.text_layers, cfg.text_heads, activation)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, cfg.embed_dim) * width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def encode_image(self, images: torch.Tensor, features_list: tuple[int, ...]):
        return self.visual(images, features_list)

    def encode_text_prompted(self, ids: torch.Tensor, class_pos: torch.Tensor,
                             eot_pos: torch.Tensor, class_tokens: torch.Tensor,
                             prompts: TextPrompts) -> torch.Tensor:
        """docs/reproduction.md §3, batched over images and templates.

        ids [S,77] template token ids, each with one ``<|class|>`` at ``class_pos[s]`` and its end
        token at ``eot_pos[s]``; class_tokens [B,r,T] from Pre-VCP.
        Returns L2-normalized text features [B,S,E] (not yet averaged over templates).
        """
        b, r, _ = class_tokens.shape
        s, ctx = ids.shape
        n = prompts.prompt_embeddings.shape[1]
        emb = self.token_embedding(ids).to(class_tokens.dtype)  # [S, 77, T]
        # 1. the r class tokens replace <|class|>; the last r-1 positions fall off (still 77 long)
        seqs = [torch.cat([emb[i, :p].expand(b, -1, -1), class_tokens,
                           emb[i, p + 1:ctx - r + 1].expand(b, -1, -1)], dim=1)
                for i, p in enumerate(class_pos.tolist())]
        x = torch.stack(seqs, dim=1).flatten(0, 1)  # [B*S, 77, T], image-major
        x = x + self.positional_embedding.to(x.dtype)
        # 2. shallow prompt right after the start token; the last n positions fall off
        x = torch.cat([x[:, :1], prompts.project(prompts.prompt_embeddings[0], b * s),
                       x[:, 1:ctx - n]], dim=1)
        # 3. deep prompts overwrite positions 1..n before blocks 1..D
        deep = prompts.deep_prompt_embeddings
        for i, block in enumerate(self.transformer.resblocks):
            if 1 <= i <= deep.shape[0]:
                x = torch.cat([x[:, :1], prompts.project(deep[i - 1], b * s), x[:, 1 + n:]], dim=1)
            x = block(x, causal=True)
        # 4. drop the prompt positions, then prompt_norm and ln_final
        x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)  # [B*S, 77-n, T]
        x = self.ln_final(prompts.prompt_norm(x))
        # 5. the end token moved by r-1 when <|class|> became r tokens
        rows = (eot_pos + r - 1).repeat(b)  # [B*S]
        feats = x[torch.arange(b * s, device=x.device), rows] @ self.text_projection  # [B*S, E]
        return F.normalize(feats, dim=-1).view(b, s, -1)
