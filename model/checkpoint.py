"""VCP weights <-> the released checkpoint layout (docs/reproduction.md §8), plus our config key.

Layout (``train_visa.pth`` / ``train_mvtec.pth``)::

    {"trainable_linearlayer": fc.{k}.*,          # VCPCLIP.linear_layers
     "New_Lan_Embed": prompt_query, prompt_temp, prompt_linear1.fc.*,   # VCPCLIP.pre_vcp
     "Zero_try": prompt_temp_l1, q_proj_pre.*, k_proj_pre_1.*, ...,     # VCPCLIP.post_vcp
     prompt_embeddings, deep_prompt_embeddings, prompt_proj.*, ...}     # VCPCLIP.prompts

Files this project writes add ``"vcp_config"`` and, from training, ``"optimizer"``, ``"epoch"``
(epochs done) and ``"train_args"``; one written on a stop signal also ``"step"`` (steps done in
epoch + 1), ``"epoch_losses"`` and ``"world_size"``. Readers that know only the released keys
ignore them.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch

from .clip import CLIPConfig
from .errors import InputError
from .vcp_clip import VCPCLIP, VCPConfig

__all__ = ["CheckpointError", "GROUPS", "CONFIG_KEY", "vcp_state_dict", "save_checkpoint",
           "read_checkpoint", "load_vcp_weights", "checkpoint_configs", "atomic_save"]

GROUPS = {"trainable_linearlayer": "linear_layers", "New_Lan_Embed": "pre_vcp",
          "Zero_try": "post_vcp"}  # checkpoint key -> VCPCLIP attribute
TOP_LEVEL = "prompts"  # its tensors sit at the top level of the file
CONFIG_KEY = "vcp_config"  # ours: {"vcp": VCPConfig fields, "clip": CLIPConfig JSON}


class CheckpointError(InputError, ValueError):
    """A VCP checkpoint that is missing, unreadable or does not fit the model."""


def vcp_state_dict(model: VCPCLIP) -> dict:
    """The trained weights of ``model`` in the released layout (tensors detached, on the CPU)."""
    def cpu(module):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    state = {key: cpu(getattr(model, attr)) for key, attr in GROUPS.items()}
    state.update(cpu(getattr(model, TOP_LEVEL)))
    return state


def atomic_save(obj, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: never a half-written
    file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # umask-honouring open
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(model: VCPCLIP, path: str | Path, **extra) -> None:
    """Write the released layout + our config (+ any ``extra`` top-level entries) atomically."""
    payload = vcp_state_dict(model)
    payload[CONFIG_KEY] = {"vcp": model.cfg.to_dict(), "clip": model.clip.cfg.to_json_dict()}
    payload.update(extra)
    atomic_save(payload, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"VCP checkpoint not found at {path} (the released weights are "
                              f"train_visa.pth / train_mvtec.pth; see README, 'Weights')")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own messages run to several lines: keep the first
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"cannot read VCP checkpoint {path} (not a file that torch.save "
                              f"wrote, or cut short): {type(e).__name__}: {reason}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is not a VCP checkpoint (expected a dict, "
                              f"found {type(payload).__name__})")
    return payload


def checkpoint_configs(payload: dict) -> tuple[VCPConfig | None, CLIPConfig | None]:
    """The configs our checkpoints carry; (None, None) for a released file."""
    saved = payload.get(CONFIG_KEY)
    if not saved:
        return None, None
    unknown = sorted(set(saved["vcp"]) - set(VCPConfig.__dataclass_fields__))
    if unknown:
        raise CheckpointError(f"the checkpoint's {CONFIG_KEY} has fields this version does not "
                              f"know: {unknown} (written by a newer version?)")
    return VCPConfig(**saved["vcp"]), CLIPConfig.from_json_dict(saved["clip"])


def _check(found: dict, expected: dict, where: str) -> list[str]:
    problems = []
    for key, tensor in expected.items():
        if key not in found:
            problems.append(f"{where}{key}: missing (expected shape {list(tensor.shape)})")
        elif not torch.is_tensor(found[key]) or found[key].shape != tensor.shape:
            shape = list(found[key].shape) if torch.is_tensor(found[key]) else type(found[key])
            problems.append(f"{where}{key}: expected shape {list(tensor.shape)}, found {shape}")
    return problems


def load_vcp_weights(model: VCPCLIP, payload: dict | str | Path, source: str = "") -> VCPCLIP:
    """Load a released-layout checkpoint (a path, or its already-read dict from ``source``) into
    ``model``; every problem is named before anything is loaded (key, expected, found shape)."""
    if not isinstance(payload, dict):
        source, payload = str(payload), read_checkpoint(payload)
    problems = []
    for key, attr in GROUPS.items():
        group = payload.get(key)
        if not isinstance(group, dict):
            problems.append(f"{key}: missing group")
            continue
        problems += _check(group, getattr(model, attr).state_dict(), f"{key}.")
    problems += _check(payload, getattr(model, TOP_LEVEL).state_dict(), "")
    if problems:
        raise CheckpointError(f"{source or 'the'} VCP checkpoint does not fit the model:\n  "
                              + "\n  ".join(problems))
    for module, values in [(getattr(model, a), payload[k]) for k, a in GROUPS.items()] + [
            (getattr(model, TOP_LEVEL), payload)]:
        module.load_state_dict({k: values[k] for k in module.state_dict()})
    return model
