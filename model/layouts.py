"""The layouts of CLIP weight files, all renamed to OpenAI's key names (docs/reproduction.md §1).

The layout is told by the keys alone. OpenAI's names are those of ``ViT-L-14-336px.pt``, of a
state dict of it and of open_clip's ``CLIP``; open_clip also writes them under ``module.`` (a
training checkpoint of a DDP run) and, for its ``CustomTextCLIP``, the text tower under
``text.``. transformers' ``CLIPModel`` has names of its own, separate q/k/v projections and
``nn.Linear`` projections (a transposed matrix). The table of files is in docs/weights.md.
"""
from __future__ import annotations

import re

import torch

from .errors import InputError

__all__ = ["WeightsError", "ACCEPTED", "detect_layout", "to_openai_names"]

ACCEPTED = ("OpenAI's names ('visual.conv1.weight', ...: ViT-L-14-336px.pt, a state dict of it, "
            "open_clip's checkpoints, also under 'module.' or with the text tower under "
            "'text.') or transformers' CLIPModel ('vision_model.embeddings.patch_embedding.weight',"
            " ...); see docs/weights.md")
# Entries of OpenAI's archive that are not weights (so are the '*.position_ids' buffers of older
# transformers checkpoints).
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size")
# What VCP-CLIP reads of both towers, in OpenAI's names.
REQUIRED = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")

# transformers' CLIPModel name -> OpenAI's, outside the blocks.
HF_NAMES = {
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear weights [E, W] -> OpenAI's projection matrices [W, E].
HF_TRANSPOSED = {"visual_projection.weight": "visual.proj",
                 "text_projection.weight": "text_projection"}
HF_TOWERS = {"vision_model": "visual.transformer.resblocks", "text_model": "transformer.resblocks"}
HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
            "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
HF_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
HF_BLOCK_KEY = re.compile(r"(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")


class WeightsError(InputError, ValueError):
    """Weights that are missing, unreadable or of the wrong architecture."""


def _strip_open_clip(state: dict) -> tuple[dict, bool]:
    """open_clip's ``module.`` and ``text.`` prefixes removed; whether there were any."""
    stripped = False
    if state and all(k.startswith("module.") for k in state):
        state, stripped = {k[len("module."):]: v for k, v in state.items()}, True
    if "text.token_embedding.weight" in state:
        state = {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}
        stripped = True
    return state, stripped


def detect_layout(state: dict, source: str) -> str:
    """'openai', 'open_clip' or 'transformers', from the keys; any other layout is an error that
    names ``source``, the layouts accepted and the first keys found."""
    if "vision_model.embeddings.patch_embedding.weight" in state:
        return "transformers"
    names, open_clip = _strip_open_clip(state)
    # a ResNet CLIP has a 'visual.conv1' too: its stem's first convolution
    if "visual.attnpool.positional_embedding" in names or "visual.layer1.0.conv1.weight" in names:
        raise WeightsError(f"{source} holds a ResNet CLIP ('visual.layer1.*', "
                           "'visual.attnpool.*'): VCP-CLIP needs a CLIP ViT (ViT-L/14@336)")
    if "visual.conv1.weight" in names:
        return "open_clip" if open_clip else "openai"
    first = ", ".join(repr(k) for k in list(state)[:5]) or "none"
    raise WeightsError(f"{source} holds no CLIP ViT weights in a layout this loader reads "
                       f"(first keys: {first}); accepted: {ACCEPTED}")


def _from_transformers(state: dict) -> dict:
    """transformers' CLIPModel tensors under OpenAI's names; q/k/v of each block concatenated
    into ``in_proj_weight [3W, W]`` / ``in_proj_bias [3W]``. Unknown names are kept, so that
    they surface as unexpected keys."""
    out, qkv = {}, {}
    for key, value in state.items():
        block = HF_BLOCK_KEY.fullmatch(key)
        if key in HF_NAMES:
            out[HF_NAMES[key]] = value
        elif key in HF_TRANSPOSED:
            out[HF_TRANSPOSED[key]] = value.t().contiguous()  # [E, W] -> [W, E]
        elif block and block[3] in HF_BLOCK:
            out[f"{HF_TOWERS[block[1]]}.{block[2]}.{HF_BLOCK[block[3]]}.{block[4]}"] = value
        elif block and block[3] in HF_QKV:
            slots = qkv.setdefault(f"{HF_TOWERS[block[1]]}.{block[2]}.attn.in_proj_{block[4]}",
                                   [None] * 3)
            slots[HF_QKV.index(block[3])] = value
        else:
            out[key] = value
    out.update({k: torch.cat(v) for k, v in qkv.items() if all(t is not None for t in v)})
    return out


def to_openai_names(state: dict, layout: str, source: str) -> dict[str, torch.Tensor]:
    """The tensors of ``layout`` (from :func:`detect_layout`) under OpenAI's key names, without
    the entries that are not weights; both towers must be there."""
    state = {k: v for k, v in state.items()
             if k not in NOT_WEIGHTS and not k.endswith("position_ids")}
    state = _from_transformers(state) if layout == "transformers" else _strip_open_clip(state)[0]
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise WeightsError(f"{source} ({layout} layout) lacks {missing} (OpenAI's names): "
                           "VCP-CLIP needs both towers of a CLIP ViT")
    return state
