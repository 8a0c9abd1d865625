"""The command line of every front end: the shared flags (the reference's names and defaults),
the one-line error reporter, and the translation of flags into library objects (a model source,
a runtime, a scoring strategy, a predictor). Library modules never import this file."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import torch

from model import InputError
from utils.device import PRECISIONS, select_device
from utils.errors import UsageError
from utils.data.images import expand_inputs
from utils.paths import DEFAULT_CLIP
from utils.inference.prediction import Predictor
from utils.inference.runtime import ModelSource, Runtime, TorchRuntime
from utils.inference.tiling import DEFAULT_OVERLAP, MIN_SIDE, Tiling
from utils.scoring import FUSIONS, STRATEGIES, Context, Strategy, make_strategy

# What a user's flags, files, data or disk can get wrong: reported as one line, never a traceback.
INPUT_ERRORS = (InputError,)


def fail(error: Exception) -> int:
    """Print an input error for the user (``--<option>`` first where it names one); the
    scripts' exit status for it."""
    option = getattr(error, "option", None)
    print(f"error: {'--' + option + ' ' if option else ''}{error}", file=sys.stderr)
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


ALL_SHOTS = "all"  # --k_shot all: every normal train image of the product


def positive(text: str) -> float:
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def shots(text: str) -> int | str:
    """An argparse type: ``all`` or an int >= 0 (``--k_shot``)."""
    return ALL_SHOTS if text == ALL_SHOTS else at_least(0)(text)


def shot_count(k_shot: int | str) -> int | None:
    """``--k_shot``'s value as ``choose_references`` takes it: K, or None for all."""
    return None if k_shot == ALL_SHOTS else k_shot


def run_flags(args: argparse.Namespace, ignored: tuple[str, ...], **extra) -> dict:
    """What a run's results depend on, for ``--resume``: its flags but ``ignored`` (where it
    writes, how fast, on what device), and ``extra``; JSON-normalized, as a progress file keeps
    them."""
    kept = {k: v for k, v in vars(args).items() if k not in ignored}
    return json.loads(json.dumps({**kept, **extra}))


def inputs_of(specs: list[str], report: bool = True) -> list[Path]:
    """The image files that ``specs`` (files, folders, globs) name; with ``report`` each file
    a folder or glob held that is not inspected is named once on stderr, with why."""
    paths, ignored = expand_inputs(specs)
    for path, reason in ignored if report else ():
        print(f"note: not inspected: {path}: {reason}", file=sys.stderr)
    return paths


def check_output_folder(path: str | Path, flag: str) -> None:
    """Fail before any work if ``path`` cannot be (or become) a folder we can write in; nothing
    is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {existing}")


# -- the model --------------------------------------------------------------------------------

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


# VCPConfig fields that model flags set
FLAG_FIELDS = ("features_list", "image_size", "prompt_len", "deep_prompt_len",
               "total_d_layer_len", "use_global", "activation", "prompt_dropout")


def model_source(args: argparse.Namespace, checkpoint: str | None) -> ModelSource:
    """The model the flags name, with the VCP checkpoint ``checkpoint``."""
    overrides = {f: getattr(args, f) for f in FLAG_FIELDS if getattr(args, f, None) is not None}
    if "features_list" in overrides:
        overrides["features_list"] = tuple(overrides["features_list"])
    return ModelSource(checkpoint or None, args.pretrained_path, args.config_path, args.model,
                       overrides)


def device_of(args: argparse.Namespace) -> torch.device:
    return select_device(args.device, args.device_id)


# -- runtimes ---------------------------------------------------------------------------------

def add_onnx_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", default=None, metavar="MODEL.onnx",
                        help="run this export.py graph on ONNX Runtime instead of the PyTorch "
                             "model (--checkpoint_path and --pretrained_path are then not read)")


# What an exported model has fixed: with --onnx these flags would silently do nothing
FIXED_BY_EXPORT = (*FLAG_FIELDS, "precision", "config_path", "model")


def runtime_of(args: argparse.Namespace) -> Runtime:
    """``--onnx``'s graph on ONNX Runtime, else the PyTorch model of the model flags."""
    if getattr(args, "onnx", None):
        fixed = [f"--{f}" for f in FIXED_BY_EXPORT if getattr(args, f, None) is not None]
        if fixed:
            raise UsageError(f"{', '.join(fixed)} cannot be used with --onnx: the exported "
                             "model fixes the model and outputs only the zero-shot maps (see "
                             "its .json)")
        from utils.inference.onnx_runtime import OnnxRuntime
        return OnnxRuntime(args.onnx, args.device, args.device_id)
    return TorchRuntime.load(model_source(args, args.checkpoint_path), device_of(args),
                             args.precision)


# -- tiled inference --------------------------------------------------------------------------

def add_tile_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("high-resolution images (ours; docs/predict.md)")
    g.add_argument("--tile", type=at_least(MIN_SIDE), default=None, metavar="SIDE",
                   help="cut each image into overlapping square tiles of SIDE pixels, each run "
                        "at the model's input size, and stitch their maps into one over the "
                        "whole image (default: the whole image resized to the input size)")
    g.add_argument("--tile_overlap", type=float, default=None, metavar="F",
                   help=f"with --tile: the least share of a tile's side that neighbours share "
                        f"(default {DEFAULT_OVERLAP})")


def tiling_of(args: argparse.Namespace) -> Tiling | None:
    """The tiling the flags ask for (None: whole images)."""
    if args.tile is None:
        if args.tile_overlap is not None:
            raise UsageError("--tile_overlap sets the overlap of tiles: give --tile SIDE too")
        return None
    return Tiling(args.tile, DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap)


# -- scoring strategies -----------------------------------------------------------------------

def add_scoring_flags(parser: argparse.ArgumentParser, references: str) -> None:
    """``--scoring`` (with ``--mutual`` as its short form), ``--fusion``, every registered
    strategy's options, and where the references come from: ``references`` is ``"k_shot"``
    (test.py: K normal train images per product) or ``"paths"`` (``--reference`` images)."""
    g = parser.add_argument_group("beyond zero-shot (ours; docs/scoring.md)")
    g.add_argument("--scoring", choices=list(STRATEGIES), default=None,
                   help="how the images are scored (default zero_shot; reference with "
                        "--k_shot/--reference)")
    g.add_argument("--mutual", dest="scoring", action="store_const", const="mutual",
                   help="the same as --scoring mutual: MuSc, each image scored against the "
                        "other images of its group (no labels)")
    if references == "k_shot":
        g.add_argument("--k_shot", type=shots, default=0, metavar="K",
                       help="K normal train images per product as references, or 'all' of them "
                            "(default 0)")
    else:
        g.add_argument("--reference", nargs="+", metavar="INPUT", default=None,
                       help="normal images (files, folders or globs) to compare every patch "
                            "with; put it after the inputs")
    g.add_argument("--fusion", choices=FUSIONS, default=FUSIONS[0],
                   help="how the patch-score map joins the zero-shot maps (default %(default)s)")
    for strategy in STRATEGIES.values():
        for f in fields(strategy.Options):
            default = f.default if f.default is not MISSING else f.default_factory()
            many = isinstance(default, tuple)  # one or more values
            g.add_argument(f"--{f.name}", type=type(default[0] if many else default),
                           nargs="+" if many else None, default=default,
                           help=f.metadata.get("help", f"{strategy.name} scoring"))


def strategy_options(args: argparse.Namespace) -> dict:
    """Every registered strategy's options as the flags set them (``add_scoring_flags``)."""
    return {f.name: getattr(args, f.name) for strategy in STRATEGIES.values()
            for f in fields(strategy.Options)}


def scoring_name(args: argparse.Namespace) -> str:
    """The strategy the flags choose; references given with another strategy are refused."""
    given = bool(getattr(args, "k_shot", 0)) or getattr(args, "reference", None) is not None
    flag = "--k_shot" if hasattr(args, "k_shot") else "--reference"
    name = args.scoring or ("reference" if given else "zero_shot")
    if given and name != "reference":
        raise UsageError(f"{flag} and --{'mutual' if name == 'mutual' else 'scoring ' + name}: "
                         "choose one")
    if STRATEGIES[name].needs_references and not given:
        raise UsageError(f"--scoring {name} needs references: give {flag}")
    return name


def strategy_of(args: argparse.Namespace, context: Context | None) -> Strategy:
    """The scoring strategy of the flags (checked; ``context`` None: checked only)."""
    return make_strategy(scoring_name(args), vars(args), context, args.fusion)


def reference_paths(args: argparse.Namespace) -> list[Path] | None:
    """The ``--reference`` images (None without the flag); fails before any model work."""
    if args.reference is None:
        return None
    references = inputs_of(args.reference)
    if not references:
        raise UsageError(f"--reference: no images found in {args.reference}")
    return references


def predictor_of(args: argparse.Namespace) -> Predictor:
    """The runtime, scoring and tiling the flags name as one ``Predictor`` of image paths: what
    predict.py, its ``--calibrate`` and the inspection page run; stitched maps at most
    ``--max_output_side`` a side."""
    strategy_of(args, None)  # bad scoring and tiling flags fail before the model is built
    tiling = tiling_of(args)
    references = reference_paths(args)
    runtime = runtime_of(args)
    context = Context(runtime, runtime.image_size, references, args.batch_size)
    return Predictor(runtime, strategy_of(args, context), args.batch_size, args.num_workers,
                     tiling, args.max_output_side)
