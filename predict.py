"""Zero-shot segmentation of your own images: no masks, no meta file.

    python predict.py photos/ extra.jpg "more/*.png" --checkpoint_path vcp_weight/train_visa.pth \
        --save_path predictions --threshold 0.6 --save_maps

Writes ``overlays/<name>.png`` (heat map over the image), ``scores.csv`` (path, image score, max
pixel score), with ``--threshold`` ``masks/<name>.png`` (0/255, the input's size), with
``--save_maps`` ``maps/<name>.npy`` (the map at the model's resolution; with ``--tile`` the
stitched map). The prediction service itself is the library's (``utils/inference/prediction.py``,
``utils/inference/outputs.py``); this script wires flags to it, writes, resumes and reports.

    python predict.py --calibrate normal/ --false_alarm_rate 0.01 [--defective bad/] \
        [--held_out more_normal/] --checkpoint_path ...

prints T, the threshold at which at most that share of the normal images has a pixel above T
(``utils/evaluation/calibration.py`` states the quantile exactly), with the recall on the
defective images and the false-alarm rate on other normal images.

Beyond zero-shot (docs/scoring.md): ``--reference good/`` compares every
patch with those of your normal images, ``--mutual`` with those of the other images in the same
folder; the images are then scored folder by folder and the patch map is fused with the
zero-shot maps (``--fusion``).

    python predict.py line3/ --reference line3_good/*.png --checkpoint_path ...
    python predict.py batch_monday/ batch_tuesday/ --mutual --checkpoint_path ...

``--onnx model.onnx`` runs a graph that ``export.py`` wrote on ONNX Runtime instead of PyTorch
(image size from its JSON; the model flags do not apply) and writes the same outputs.

High-resolution images (docs/predict.md): ``--tile SIDE`` cuts each image into overlapping square
tiles of SIDE pixels, runs them at the model's input size and stitches their maps into one map
over the whole image (``utils/inference/tiling.py``); everything above works on it alike.

    python predict.py line_scans/ --tile 518 --threshold 0.6 --checkpoint_path ...

A stopped run continues with the same command and ``--resume``: ``<save_path>/progress/`` holds
the rows of the images finished so far (removed once ``scores.csv`` is written).
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from utils.evaluation.calibration import Calibration, alarm_rate, calibrate
from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, add_onnx_flag,
                       add_scoring_flags, add_tile_flags, at_least, check_output_folder, fail,
                       inputs_of, predictor_of, run_flags, strategy_of, tiling_of)
from utils.distributed import World
from utils.errors import OutputError, UsageError
from utils.data.images import unique_names
from utils.inference.outputs import OUTPUTS, OutputWriter
from utils.paths import DEFAULT_CHECKPOINT
from utils.inference.prediction import Prediction, Predictor, Skipped, check_groups
from utils.inference.progress import Progress
from utils.inference.tiling import MAX_MAP_SIDE


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Segment anomalies in your own images (no labels)")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--save_path", default="./results/predict")
    p.add_argument("--threshold", type=float, default=None,
                   help="also write binary masks of map > T (T on the un-normalized map scale)")
    p.add_argument("--save_maps", action="store_true", help="also write each map as .npy")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.add_argument("--num_workers", type=at_least(0), default=2)
    p.add_argument("--max_output_side", type=at_least(16), default=MAX_MAP_SIDE,
                   help="longest side of a written overlay or mask, and of a stitched map with "
                        "--tile; larger ones are scaled down to it (default %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --save_path (by default a "
                        "folder that holds files is refused)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue a stopped run in --save_path after the images its "
                        f"{PROGRESS}/ lists (same inputs and flags; zero-shot scoring)")
    add_onnx_flag(p)
    add_tile_flags(p)
    c = p.add_argument_group(
        "threshold calibration (instead of INPUTs; utils/evaluation/calibration.py)")
    c.add_argument("--calibrate", metavar="NORMAL", default=None,
                   help="normal images (file, folder or glob): print T, the inverted-CDF "
                        "(1 - a) quantile of their max pixel scores")
    c.add_argument("--false_alarm_rate", type=float, default=0.01, metavar="a",
                   help="share of normal images allowed above T, in [0, 1) (default 0.01)")
    c.add_argument("--defective", metavar="DEFECTIVE", default=None,
                   help="defective images: also print the recall at T")
    c.add_argument("--held_out", metavar="NORMAL", default=None,
                   help="other normal images: also print their false-alarm rate at T")
    add_scoring_flags(p, references="paths")
    add_model_flags(p)
    return p.parse_args(argv)


PROGRESS = "progress"  # <save_path>/progress/: run.json, and rank<r>.jsonl per process
NOT_IN_RUN = ("save_path", "resume", "num_workers", "device", "device_id")


@dataclass
class Pace:
    """The images a run segmented: how many took how many tiles, their pixels, the seconds."""

    tiles: Counter = field(default_factory=Counter)  # tiles -> images
    pixels: int = 0
    seconds: float = 0.0

    def add(self, result: Prediction) -> None:
        self.tiles[result.tiles] += 1
        self.pixels += math.prod(result.size) if result.size else 0

    @staticmethod
    def merged(paces: list["Pace"]) -> "Pace":
        """The processes' paces as one (torchrun: they ran side by side)."""
        return Pace(sum((p.tiles for p in paces), Counter()), sum(p.pixels for p in paces),
                    max(p.seconds for p in paces))

    def summary(self) -> str:
        counts = ", ".join(f"{t} ({n} image{'s' * (n > 1)})" for t, n in sorted(self.tiles.items()))
        mp = self.pixels / 1e6
        rate = f"{self.seconds / mp:.3g} s per megapixel" if mp else "no pixels"
        return f"  tiles per image: {counts}; {rate} ({mp:.3g} megapixels in {self.seconds:.1f} s)"


def segmented(run: Predictor, paths: list[Path], desc: str, shard: World):
    """``run``'s results for ``paths`` under a progress bar that counts tiles (process 0's)."""
    with tqdm(total=run.tile_count(paths), desc=desc, unit="tile",
              disable=not shard.main) as bar:
        for result in run(paths):
            bar.update(result.tiles)
            yield result


def predict(args: argparse.Namespace, shard: World) -> tuple[list[dict], list[str], Pace]:
    """This process's share of the inputs (all of them in a plain run); every process returns
    the rows of all inputs in input order, the skipped paths and the run's pace."""
    if not args.inputs:
        raise UsageError("give INPUT images to segment, or --calibrate NORMAL")
    paths = inputs_of(args.inputs, report=shard.main)
    if not paths:
        raise UsageError(f"no images found in {args.inputs}")
    check_output_folder(args.save_path, "--save_path")
    strategy = strategy_of(args, None)
    check_groups(paths, strategy, tiling_of(args))
    if args.resume and strategy.patch_map:
        raise UsageError("--resume: --reference and --mutual fuse the maps folder by folder; "
                         "run them again whole")
    stale = earlier_outputs(args)
    run = predictor_of(args)  # a model or reference that fails to load leaves the folder as it was
    shard.gather(None)  # every process has looked before any clears
    if shard.main:
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    progress = Progress(Path(args.save_path) / PROGRESS,
                        run_flags(args, NOT_IN_RUN, inputs=[str(p) for p in paths]),
                        args.resume, shard)
    writer = OutputWriter(args.save_path, args.threshold, args.save_maps, args.max_output_side)
    names = unique_names(paths)  # over all inputs: the same in every process
    mine = shard.indices(len(paths), args.batch_size)
    rows = {i: progress.rows[i] for i in mine if i in progress.rows}
    failed = {i: progress.skipped[i] for i in mine if i in progress.skipped}
    # from the batch (as an uninterrupted run batches them) of the first unfinished image
    todo = [k for k, i in enumerate(mine) if not progress.finished(i)]
    start = todo[0] // args.batch_size * args.batch_size if todo else len(mine)
    pace, began = Pace(), time.perf_counter()
    for result in segmented(run, [paths[i] for i in mine[start:]], "predict", shard):
        index = mine[start + result.index]
        if progress.finished(index):
            continue
        if isinstance(result, Prediction):
            pace.add(result)
            try:
                writer.write(names[index], result)
            except OSError as e:
                raise OutputError(f"cannot write the outputs of {result.path} in "
                                  f"{args.save_path}: {e.strerror or e}; the images before it "
                                  "are kept: rerun with --resume") from None
            rows[index] = result.row()
            progress.record(index, row=rows[index])
        else:  # reported by the one process that owns the file
            warn_skipped(result)
            failed[index] = str(result.path)
            progress.record(index, skipped=failed[index])
    pace.seconds = time.perf_counter() - began
    gathered = shard.gather((rows, failed, pace))
    rows = [r for i, r in sorted(i_r for part, _, _ in gathered for i_r in part.items())]
    failed = [p for i, p in sorted(i_p for _, part, _ in gathered for i_p in part.items())]
    if shard.main:
        writer.write_scores(rows)
    progress.close()
    return rows, failed, Pace.merged([p for _, _, p in gathered])


def earlier_outputs(args: argparse.Namespace) -> list[Path]:
    """What ``--overwrite`` clears in ``--save_path``; a folder that holds files is refused
    without it (they would look like this run's), and with it where it holds other files."""
    out = Path(args.save_path)
    found = sorted(out.iterdir()) if out.is_dir() and not args.resume else []
    others = [p.name for p in found if p.name not in OUTPUTS]
    if found and not args.overwrite:
        listed = ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else "")
        raise UsageError(f"--save_path {out} is not empty ({listed}): its files would look like "
                         "this run's; choose a new folder, add --overwrite to replace an earlier "
                         "run's outputs, or --resume to continue it")
    if others:
        raise UsageError(f"--overwrite: --save_path {out} holds files that predict.py does not "
                         f"write ({', '.join(others[:3])}); choose a new folder")
    return found


def warn_skipped(skipped: Skipped) -> None:
    print(f"warning: skipped {skipped.path}: {skipped.reason}", file=sys.stderr)


def max_pixel_scores(run: Predictor, paths: list[Path], desc: str, shard: World,
                     batch_size: int) -> list[float]:
    """Each readable image's max pixel score, in input order (this process scores its share);
    unreadable ones are skipped with a warning."""
    mine = shard.indices(len(paths), batch_size)
    scores = {}
    for result in segmented(run, [paths[i] for i in mine], desc, shard):
        if isinstance(result, Prediction):
            scores[mine[result.index]] = result.max_pixel_score
        else:
            warn_skipped(result)
    return [s for part in shard.gather(scores) for _, s in sorted(part.items())]


def calibrate_threshold(args: argparse.Namespace,
                        shard: World) -> tuple[Calibration, list[float]]:
    """T from ``--calibrate`` (and the recall on ``--defective``); the held-out normal images'
    max pixel scores beside it."""
    if args.inputs:
        raise UsageError(f"--calibrate takes no INPUTs (got {args.inputs}); segment them "
                         "afterwards with --threshold T")
    if args.resume:
        raise UsageError("--resume continues a stopped segmentation of INPUTs, not --calibrate")
    if not 0.0 <= args.false_alarm_rate < 1.0:
        raise UsageError(f"--false_alarm_rate: expected a number in [0, 1), got "
                         f"{args.false_alarm_rate}")
    sets = {flag: getattr(args, flag) for flag in ("calibrate", "defective", "held_out")}
    paths = {flag: inputs_of([spec], report=shard.main) for flag, spec in sets.items()
             if spec is not None}
    for flag, found in paths.items():
        if not found:
            raise UsageError(f"--{flag} {sets[flag]}: no images found")
    run = predictor_of(args)
    scores = {flag: max_pixel_scores(run, found, flag, shard, args.batch_size)
              for flag, found in paths.items()}
    if not scores["calibrate"]:
        raise UsageError(f"--calibrate {args.calibrate}: none of the images could be read")
    return (calibrate(scores["calibrate"], args.false_alarm_rate, scores.get("defective", [])),
            scores.get("held_out", []))


def report_calibration(c: Calibration, held_out: list[float]) -> None:
    n, a = len(c.normal_scores), c.false_alarm_rate
    print(f"T = {c.threshold!r}")
    print(f"  the inverted-CDF (1 - {a:g}) quantile of the max pixel scores of {n} normal images")
    print(f"  normal images: {round(c.normal_alarm_rate * n)} of {n} above T "
          f"(false-alarm rate {c.normal_alarm_rate:.4f})")
    if n * a < 1:
        need = f"; a rate of {a:g} needs at least {math.ceil(1 / a)} normal images" if a else ""
        print(f"  note: a * n < 1, so T is the largest normal score{need}")
    if c.defective_scores:
        m = len(c.defective_scores)
        print(f"  defective images: {round(c.recall * m)} of {m} above T (recall {c.recall:.4f})")
    if held_out:
        rate = alarm_rate(held_out, c.threshold)
        print(f"  held-out normal images: {round(rate * len(held_out))} of {len(held_out)} "
              f"above T (false-alarm rate {rate:.4f})")


def main(argv=None) -> int:
    args = parse_args(argv)
    # your own files: no decompression-bomb guard, so a 14000x14000 photo is read as any other
    # (Pillow warns above 89 and refuses above 179 megapixels; the server keeps a limit of its own)
    Image.MAX_IMAGE_PIXELS = None
    shard = World()
    if shard.world > 1 and not args.device:
        args.device_id = shard.local_rank  # one accelerator per process, if there are any
    try:
        if shard.world > 1 and strategy_of(args, None).patch_map:
            raise UsageError("--reference and --mutual score the images folder by folder in one "
                             "process: run them without torchrun")
        with shard:
            if args.calibrate is not None:
                calibration = calibrate_threshold(args, shard)
                if shard.main:
                    report_calibration(*calibration)
                return 0
            rows, failed, pace = predict(args, shard)
    except INPUT_ERRORS as e:
        return fail(e)
    if shard.main:
        print(f"{len(rows)} images segmented, {len(failed)} skipped; written in "
              f"{Path(args.save_path).resolve()} (scores.csv, overlays/"
              f"{', masks/' if args.threshold is not None else ''}"
              f"{', maps/' if args.save_maps else ''})")
        if pace.tiles:
            print(pace.summary())
        for path in failed:
            print(f"  skipped: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
