"""VCP-CLIP: CLIP backbone + Pre-VCP + per-layer linear maps + Post-VCP -> anomaly maps
(docs/reproduction.md §3-6)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import torch
import torch.nn.functional as F
from torch import nn

from .clip import CLIP, ConfigError, TextPrompts
from .post_vcp import PostVCP
from .pre_vcp import PreVCP
from .tokenizer import CLASS, CLASS_ID, Tokenizer

__all__ = ["VCPConfig", "VCPCLIP", "AnomalyMaps", "TEMPLATES", "patch_map", "upsample_patches"]

# One template per state (docs/reproduction.md §2); index 0 = normal, 1 = abnormal.
TEMPLATES = ((f"a photo of a good {CLASS}",), (f"a photo of a damaged {CLASS}",))


@dataclass(frozen=True)
class VCPConfig:
    """Everything VCP-CLIP adds on top of a CLIP checkpoint. Defaults are the reference's."""

    features_list: tuple[int, ...] = (6, 12, 18, 24)  # tapped vision blocks, 1-based
    image_size: int = 518
    prompt_len: int = 2  # r: class tokens made by Pre-VCP
    deep_prompt_len: int = 1  # n: learnable prompt tokens per text layer
    total_d_layer_len: int = 11  # D: text blocks (after the first) that get deep prompts
    use_global: bool = True  # Pre-VCP on; off = a fixed learnable class token
    # exact GELU: the released checkpoints were trained with it; never taken from the CLIP file
    activation: str = "gelu"
    post_vcp_heads: int = 8
    prompt_dropout: float = 0.1  # on the projected text prompts, active only in training

    def __post_init__(self):
        object.__setattr__(self, "features_list", tuple(int(i) for i in self.features_list))
        layers = self.features_list
        if not layers or len(set(layers)) != len(layers):
            raise ConfigError(f"features_list {list(layers)}: needs one or more distinct layers")
        for name in ("image_size", "prompt_len", "deep_prompt_len", "post_vcp_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AnomalyMaps:
    """Per tapped layer, the patch logits [B,L,2] of both branches (channel 1 = abnormal), made into
    maps at ``size`` on demand, and the L2-normalized patch tokens [B,L,W] (class token removed)
    that the Post-VCP branch read: what few-shot and mutual scoring compare
    (``model/patch_scoring.py``). Also what the backbone gave, as it gave it (the same tensors,
    not copies): each tapped block's raw output tokens [B,1+L,W], class token first, what MuSc's
    LNAMD normalizes, and the CLIP image embeddings [B,E] (not normalized) that Pre-VCP and
    MuSc's RsCIN read (``model/musc.py``)."""

    size: int
    raw_logits: list[torch.Tensor] = field(default_factory=list)  # linear branch (Pre-VCP text)
    new_logits: list[torch.Tensor] = field(default_factory=list)  # Post-VCP branch
    patch_tokens: list[torch.Tensor] = field(default_factory=list)  # [B, L, W] per layer
    raw_tokens: list[torch.Tensor] = field(default_factory=list)  # [B, 1+L, W] per layer
    image_features: torch.Tensor | None = None  # [B, E]

    @property
    def raw(self) -> list[torch.Tensor]:
        """The linear branch's 2-channel softmax maps [B,2,S,S] per layer (training's loss), made on
        each access."""
        return [patch_map(x, self.size) for x in self.raw_logits]

    @property
    def new(self) -> list[torch.Tensor]:
        """The Post-VCP branch's 2-channel softmax maps [B,2,S,S] per layer, made on each access."""
        return [patch_map(x, self.size) for x in self.new_logits]

    def abnormal(self, per_image: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Test-time maps (docs/reproduction.md §6): mean over layers of channel 1 -> ([B,S,S],
        [B,S,S]).

        ``per_image``: make the maps one image at a time, or the whole batch at once; the values
        are the same bit for bit (``tests/test_vcp_clip.py``). The default is one image at a time
        on a CPU (one image's maps take 17 MB at 518 px, a batch of 8's 137 MB, and the smaller
        working set is faster: ``bench/forward.py`` prints both, docs/performance.md), the whole
        batch elsewhere and in an exported graph."""
        per_image = self.raw_logits[0].device.type == "cpu" if per_image is None else per_image
        b = self.raw_logits[0].shape[0]
        chunks = [slice(i, i + 1) for i in range(b)] if per_image else [slice(None)]
        return tuple(torch.cat([_mean_abnormal([x[c] for x in branch], self.size) for c in chunks])
                     for branch in (self.raw_logits, self.new_logits))


def _mean_abnormal(logits: list[torch.Tensor], size: int) -> torch.Tensor:
    """Per layer [b,L,2] -> the mean over layers of the abnormal channel of their maps [b,S,S]."""
    return torch.stack([patch_map(x, size)[:, 1] for x in logits]).mean(0)


def upsample_patches(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per-patch values [B,C,L] (row-major H x H grid) -> [B,C,S,S] (bilinear, align_corners=True,
    docs/reproduction.md §6)."""
    b, c, n = x.shape
    h = int(round(n ** 0.5))
    # Contiguous [B,C,h,h]: the same values, bit for bit, as the channels-last view that a
    # transposed [B,L,C] gives (forward and backward; tests/test_vcp_clip.py), and a faster
    # upsampling kernel on a CPU (docs/performance.md).
    return F.interpolate(x.reshape(b, c, h, h).contiguous(), size=(size, size), mode="bilinear",
                         align_corners=True)


def patch_map(logits: torch.Tensor, size: int) -> torch.Tensor:
    """[B,L,2] patch logits -> [B,2,S,S] probabilities (bilinear, align_corners=True)."""
    return upsample_patches(logits.transpose(1, 2), size).softmax(dim=1)


class LinearLayers(nn.Module):
    """One ``nn.Linear(W -> E)`` per tapped layer, named ``fc.{k}`` as in the checkpoints."""

    def __init__(self, n: int, vision_width: int, embed_dim: int):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(vision_width, embed_dim) for _ in range(n))


class VCPCLIP(nn.Module):
    """The whole model. ``forward(images [B,3,S,S]) -> AnomalyMaps``. The CLIP backbone is frozen
    and its vision forward runs without gradients; the trainable parts are ``prompts``,
    ``pre_vcp``, ``post_vcp`` and ``linear_layers``."""

    def __init__(self, clip: CLIP, cfg: VCPConfig, tokenizer: Tokenizer | None = None):
        super().__init__()
        bb = clip.cfg
        bad = [i for i in cfg.features_list if not 1 <= i <= bb.vision_layers]
        if bad:
            raise ConfigError(f"features_list {list(cfg.features_list)}: layers {bad} are outside "
                             f"1..{bb.vision_layers} of this backbone")
        if not 0 <= cfg.total_d_layer_len <= bb.text_layers - 1:
            raise ConfigError(f"total_d_layer_len {cfg.total_d_layer_len} must be in "
                             f"0..{bb.text_layers - 1} (text layers - 1)")
        self.cfg = cfg
        self.clip = clip.requires_grad_(False)
        self.prompts = TextPrompts(cfg.deep_prompt_len, cfg.total_d_layer_len, bb.text_width,
                                   bb.embed_dim, cfg.prompt_dropout)
        self.pre_vcp = PreVCP(cfg.prompt_len, bb.text_width, bb.embed_dim, cfg.use_global)
        self.post_vcp = PostVCP(bb.text_width, bb.vision_width, cfg.post_vcp_heads)
        self.linear_layers = LinearLayers(len(cfg.features_list), bb.vision_width, bb.embed_dim)
        self._register_templates(tokenizer or Tokenizer(), bb.context_length)

    def _register_templates(self, tokenizer: Tokenizer, context_length: int) -> None:
        flat = [t for state in TEMPLATES for t in state]
        ids = tokenizer.tokenize(flat, context_length)  # [S, 77]
        self.register_buffer("template_ids", ids, persistent=False)
        self.register_buffer("class_pos", (ids == CLASS_ID).long().argmax(1), persistent=False)
        eot = tokenizer.specials["<|endoftext|>"]
        self.register_buffer("eot_pos", (ids == eot).long().argmax(1), persistent=False)
        self.templates_per_state = [len(state) for state in TEMPLATES]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"prompts": self.prompts, "pre_vcp": self.pre_vcp, "post_vcp": self.post_vcp,
                "linear_layers": self.linear_layers}

    def encode_text(self, image_features: torch.Tensor) -> torch.Tensor:
        """image_features [B,E] -> per-image text embeddings [B,2,E] (normal, abnormal)."""
        class_tokens = self.pre_vcp(image_features)  # [B, r, T]
        feats = self.clip.encode_text_prompted(self.template_ids, self.class_pos, self.eot_pos,
                                               class_tokens, self.prompts)  # [B, S, E]
        states = feats.split(self.templates_per_state, dim=1)
        return torch.stack([F.normalize(s.mean(1), dim=-1) for s in states], dim=1)

    def forward(self, images: torch.Tensor) -> AnomalyMaps:
        size = images.shape[-1]
        with torch.no_grad():  # the backbone is frozen (docs/reproduction.md §7)
            image_features, tokens = self.clip.encode_image(images, self.cfg.features_list)
        text = self.encode_text(image_features)  # [B, 2, E]
        maps = AnomalyMaps(size, raw_tokens=tokens, image_features=image_features)
        for fc, layer_tokens in zip(self.linear_layers.fc, tokens):
            patches = layer_tokens[:, 1:]  # [B, L, W], class token removed
            feats = F.normalize(fc(patches), dim=-1)  # [B, L, E]
            logits = self.pre_vcp.prompt_temp.exp() * feats @ text.transpose(1, 2)  # [B, L, 2]
            maps.raw_logits.append(logits)
            patches = F.normalize(patches, dim=-1)
            maps.patch_tokens.append(patches)
            refined = self.post_vcp(text, patches)  # [B, 2, W]
            logits = self.post_vcp.prompt_temp_l1.exp() * patches @ refined.transpose(1, 2)
            maps.new_logits.append(logits)
        return maps
