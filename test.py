"""Zero-shot test (docs/reproduction.md §10-11): per-product pixel and image metrics, the pipe
table, heat maps.

    python test.py --dataset mvtec --checkpoint_path ./vcp_weight/train_visa.pth

The protocol itself is the library's (``utils/evaluation/protocol.py``); this script turns flags
into a runtime, a dataset and a scoring strategy, runs it and reports. Beyond zero-shot
(docs/scoring.md): ``--k_shot K`` compares every test patch with the patches of K normal images
of the product's train split (``--k_shot all``: all of them; ``--coreset``: a greedy coreset of
their patches), ``--mutual`` with those of the product's other test images (MuSc). Without these
flags the numbers are the paper's zero-shot ones, bit for bit.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, add_scoring_flags,
                       at_least, check_output_folder, device_of, fail, model_source,
                       run_flags, shot_count, strategy_of)
from utils.data.dataset import AnomalyDataset, choose_references
from utils.device import seed_everything
from utils.errors import UsageError
from utils.evaluation.protocol import PROGRESS, evaluate, write_results
from utils.inference.progress import changed_keys
from utils.paths import DEFAULT_CHECKPOINT, DEFAULT_DATA
from utils.inference.runtime import TorchRuntime, load_model, read_model
from utils.scoring import Context


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description="Zero-shot anomaly segmentation test of VCP-CLIP",
                       add_help=add_help)
    p.add_argument("--data_path", default=DEFAULT_DATA, help="standardized data root")
    p.add_argument("--save_path", default="./results/test", help="log.txt, metrics.json, imgs/")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--dataset", default="mvtec", help="NAME of <data_path>/meta_NAME.json")
    p.add_argument("--seed", type=at_least(0), default=111)
    add_model_flags(p)
    g = p.add_argument_group("speed (ours)")
    g.add_argument("--batch_size", type=at_least(1), default=8)
    g.add_argument("--num_workers", type=at_least(0), default=2)
    g.add_argument("--no_vis", action="store_true", help="skip the heat-map panels")
    g = p.add_argument_group("runs that never lose work (ours)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run in --save_path after the products its "
                        f"{PROGRESS} lists (same flags)")
    add_scoring_flags(p, references="k_shot")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


NOT_IN_RUN = ("save_path", "resume", "num_workers", "no_vis", "device", "device_id")


def resumed_rows(args: argparse.Namespace) -> dict[str, dict]:
    """With ``--resume``, the rows of the products that an interrupted run with the same flags
    finished (its progress file); otherwise none."""
    path = Path(args.save_path) / PROGRESS
    if not args.resume:
        return {}
    if not path.exists():
        print(f"note: --resume: no {path}; starting from the first product", file=sys.stderr)
        return {}
    try:
        saved = json.loads(path.read_text())
        key, rows = saved["run"], saved["products"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--resume: {path} is not a progress file of test.py: {e!r}") from None
    changed = changed_keys(key, run_flags(args, NOT_IN_RUN))
    if changed:
        raise UsageError(f"--resume: {path} is from a run with other flags: "
                         f"{', '.join('--' + k for k in changed)}")
    return rows


def scoring_of(args: argparse.Namespace, strategy, references: dict) -> dict | None:
    """How the maps are scored beyond zero-shot, for log.txt and metrics.json (None: zero-shot)."""
    if not strategy.patch_map:
        return None
    if args.k_shot:
        return {"k_shot": args.k_shot, **strategy.describe(), "references": references}
    return strategy.describe()


def run(args: argparse.Namespace):
    seed_everything(args.seed)
    # everything that can be wrong with the inputs fails here, before any model work
    checked = strategy_of(args, None)
    source = model_source(args, args.checkpoint_path)
    payload, cfg = read_model(source)
    dataset = AnomalyDataset(args.data_path, args.dataset, "test", image_size=cfg.image_size)
    checked.check_sizes({p: len(r) for p, r in dataset.product_ranges.items()}, "product")
    check_output_folder(args.save_path, "--save_path")
    references = (choose_references(args.data_path, args.dataset, dataset.products,
                                    shot_count(args.k_shot), args.seed) if args.k_shot else {})
    done = resumed_rows(args)
    device = device_of(args)
    runtime = TorchRuntime(load_model(source, device, payload, cfg), device, args.precision)
    root = Path(args.data_path)
    strategy = strategy_of(args, Context(runtime, cfg.image_size,
                                         lambda product: [root / p for p in references[product]],
                                         args.batch_size))
    save_path, start = Path(args.save_path), time.time()
    evaluator = evaluate(runtime, dataset, save_path, strategy, args.batch_size,
                         args.num_workers, not args.no_vis, run_flags(args, NOT_IN_RUN), done,
                         pin_memory=device.type == "cuda")
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in evaluator.seconds.items())
    header = (f"dataset {args.dataset}, checkpoint {args.checkpoint_path}, "
              f"{len(dataset)} images, {time.time() - start:.1f} s ({stages})")
    print(write_results(evaluator.rows, save_path, header, scoring_of(args, strategy, references)))
    (save_path / PROGRESS).unlink(missing_ok=True)  # metrics.json has it all now
    return evaluator


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except INPUT_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    # SIGTERM (a job scheduler's stop) ends the run like Ctrl-C: the products already handed to
    # the metric threads are finished and recorded for --resume; status 143
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
