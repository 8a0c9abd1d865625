"""What train.py, test.py and predict.py share: the model flags (the reference's names and
defaults), the device and precision, and the one way a model is built from flags."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from model import (CheckpointError, CLIPConfig, ConfigError, VCPConfig, WeightsError,
                   build_vcp_clip, checkpoint_configs, read_checkpoint)
from utils.data import DataError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CLIP = "./pretrained_weight/ViT-L-14-336px.pt"
DEFAULT_MODEL = "ViT-L-14-336"
PRECISIONS = ("fp32", "fp16", "bf16")


class UsageError(ValueError):
    """Bad flags or inputs found before any model work; the scripts print it without a traceback."""


class OutputError(OSError):
    """An output that could not be written (a full disk, a folder made read-only mid-run)."""


# What a user's flags, files, data or disk can get wrong: reported as one line, never a traceback.
INPUT_ERRORS = (UsageError, DataError, CheckpointError, WeightsError, ConfigError, OutputError)


def fail(error: Exception) -> int:
    """Print an input error for the user; the scripts' exit status for it."""
    print(f"error: {error}", file=sys.stderr)
    return 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad value) are one ``error:`` line like the others."""

    def error(self, message: str):
        fail(UsageError(f"{message} (see {self.prog} --help)"))
        sys.exit(2)


def at_least(low: int):
    """An argparse type: an int >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def run_flags(args: argparse.Namespace, ignored: tuple[str, ...], **extra) -> dict:
    """What a run's results depend on, for ``--resume``: its flags but ``ignored`` (where it
    writes, how fast, on what device), and ``extra``; JSON-normalized, as a progress file keeps
    them."""
    kept = {k: v for k, v in vars(args).items() if k not in ignored}
    return json.loads(json.dumps({**kept, **extra}))


def changed_keys(saved: dict, now: dict) -> list[str]:
    """The keys whose values differ between two ``run_flags`` (a key missing on one side too)."""
    return sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))


def check_output_folder(path: str | Path, flag: str) -> None:
    """Fail before any work if ``path`` cannot be (or become) a folder we can write in; nothing
    is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {existing}")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Flags that shape the model. Those left unset take the checkpoint's saved config when it
    has one, else the reference's defaults (``VCPConfig``)."""
    g = parser.add_argument_group("model")
    g.add_argument("--pretrained_path", default=DEFAULT_CLIP,
                   help="CLIP weights: OpenAI's .pt, a state dict or safetensors file, a "
                        "transformers folder, an open_clip checkpoint (docs/weights.md)")
    g.add_argument("--config_path", default=None,
                   help="backbone config JSON that the weights must match "
                        "(default: configs/<model>.json)")
    g.add_argument("--model", default=None,
                   help="backbone name, configs/<model>.json (default: the checkpoint's saved "
                        "backbone, else ViT-L-14-336 as the reference)")
    g.add_argument("--pretrained", default="openai", choices=["openai"])
    g.add_argument("--features_list", type=int, nargs="+", default=None,
                   help="tapped vision layers, 1-based (default 6 12 18 24)")
    g.add_argument("--image_size", type=int, default=None, help="default 518")
    g.add_argument("--prompt_len", type=int, default=None, help="Pre-VCP class tokens (default 2)")
    g.add_argument("--deep_prompt_len", type=int, default=None, help="default 1")
    g.add_argument("--total_d_layer_len", type=int, default=None, help="default 11")
    g.add_argument("--use_global", action="store_false", default=None,
                   help="switch Pre-VCP's global context OFF (it is on by default)")
    g.add_argument("--activation", choices=["gelu", "quick_gelu"], default=None,
                   help="ours: MLP activation (default exact gelu, as the released weights; "
                        "whatever the CLIP file's own config says)")
    g.add_argument("--device_id", type=int, default=0, help="CUDA device index")
    g.add_argument("--device", default=None, help="ours: e.g. cpu or cuda:1 (default: the "
                   "accelerator, index --device_id, when there is one, else cpu)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="ours: autocast precision (default fp16 on CUDA, fp32 on CPU)")


FLAG_FIELDS = ("features_list", "image_size", "prompt_len", "deep_prompt_len",
               "total_d_layer_len", "use_global", "activation", "prompt_dropout")


def vcp_config(args: argparse.Namespace, saved: VCPConfig | None = None) -> VCPConfig:
    """Explicit flags > the checkpoint's saved config > the reference defaults."""
    base = (saved or VCPConfig()).to_dict()
    base.update({f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f, None) is not None})
    return VCPConfig(**base)


def expected_clip_config(args: argparse.Namespace, payload: dict | None) -> CLIPConfig | None:
    """The backbone the weights must match: --config_path, else --model, else None when the
    checkpoint carries its own (``build_vcp_clip`` checks that), else the reference's."""
    if args.config_path:
        path, flag = Path(args.config_path), "--config_path"
    elif args.model or payload is None or checkpoint_configs(payload)[1] is None:
        path, flag = ROOT / "configs" / f"{args.model or DEFAULT_MODEL}.json", "--model"
    else:
        return None
    if not path.is_file():
        raise UsageError(f"{flag}: backbone config {path} does not exist")
    return CLIPConfig.from_json(path)


def select_device(args: argparse.Namespace) -> torch.device:
    if args.device:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, "
                             "...)") from None
        backend = getattr(torch, device.type, None)
        if device.type != "cpu" and not (
                backend is not None and backend.is_available()
                and (device.index or 0) < getattr(backend, "device_count", lambda: 1)()):
            raise UsageError(f"--device {args.device}: this machine has no such device")
        return device
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and accelerator.is_available():
        return torch.device(accelerator.current_accelerator().type, args.device_id)
    if torch.cuda.is_available():
        return torch.device(args.device_id)  # an index alone names a CUDA device
    return torch.device("cpu")


def autocast(device: torch.device, precision: str | None):
    """fp16 autocast on an accelerator by default (as the paper), fp32 on the CPU."""
    precision = precision or ("fp32" if device.type == "cpu" else "fp16")
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_checkpoint_and_config(args: argparse.Namespace, checkpoint_path) -> tuple[dict | None, VCPConfig]:
    """Read (and so check) the checkpoint before any model work; resolve the model config."""
    payload = read_checkpoint(checkpoint_path) if checkpoint_path else None
    saved = checkpoint_configs(payload)[0] if payload is not None else None
    return payload, vcp_config(args, saved)


def build_model(args: argparse.Namespace, cfg: VCPConfig, payload: dict | None,
                device: torch.device, source: str = ""):
    """The one model builder of the scripts (fp32 weights, eval mode, on ``device``); ``source``
    names the checkpoint file that ``payload`` was read from."""
    pretrained = Path(args.pretrained_path)
    if not pretrained.is_absolute() and not pretrained.exists() and (ROOT / pretrained).exists():
        pretrained = ROOT / pretrained
    model = build_vcp_clip(pretrained, cfg, checkpoint=payload,
                           clip_config=expected_clip_config(args, payload), source=source)
    return model.to(device)
