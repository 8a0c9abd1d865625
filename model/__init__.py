"""VCP-CLIP in pure PyTorch. The public surface; see docs/api.md."""
from .build import build_vcp_clip
from .errors import InputError
from .checkpoint import (CheckpointError, checkpoint_configs, load_vcp_weights, read_checkpoint,
                         save_checkpoint, vcp_state_dict)
from .clip import CLIP, CLIPConfig, ConfigError
from .load import WeightsError, infer_config, load_clip, read_clip_state_dict
from .tokenizer import Tokenizer
from .vcp_clip import TEMPLATES, VCPCLIP, AnomalyMaps, VCPConfig

__all__ = ["build_vcp_clip", "InputError", "CheckpointError", "checkpoint_configs",
           "load_vcp_weights", "read_checkpoint", "save_checkpoint", "vcp_state_dict", "CLIP",
           "CLIPConfig", "ConfigError", "WeightsError", "infer_config", "load_clip",
           "read_clip_state_dict", "Tokenizer", "TEMPLATES", "VCPCLIP", "AnomalyMaps", "VCPConfig"]
