"""Zero-shot segmentation of your own images: no masks, no meta file.

    python predict.py photos/ extra.jpg "more/*.png" --checkpoint_path vcp_weight/train_visa.pth \
        --save_path predictions --threshold 0.6 --save_maps

Writes ``overlays/<name>.png`` (heat map over the image), ``scores.csv`` (path, image score, max
pixel score), with ``--threshold`` ``masks/<name>.png`` (0/255, the input's size), with
``--save_maps`` ``maps/<name>.npy`` (the map at the model's resolution). The prediction path
itself lives in ``utils/prediction.py``; this script only wires flags to it.
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from utils.cli import (INPUT_ERRORS, UsageError, add_model_flags, build_model, fail,
                       read_checkpoint_and_config, select_device)
from utils.prediction import (OutputWriter, Prediction, expand_inputs, predict_paths,
                              torch_maps, unique_names)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Segment anomalies in your own images (no labels)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--checkpoint_path", default="./vcp_weight/train_visa.pth")
    p.add_argument("--save_path", default="./results/predict")
    p.add_argument("--threshold", type=float, default=None,
                   help="also write binary masks of map > T (T on the un-normalized map scale)")
    p.add_argument("--save_maps", action="store_true", help="also write each map as .npy")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_workers", type=int, default=2)
    add_model_flags(p)
    return p.parse_args(argv)


def predict(args: argparse.Namespace) -> tuple[list[dict], list[str]]:
    paths = expand_inputs(args.inputs)
    if not paths:
        raise UsageError(f"no images found in {args.inputs}")
    payload, cfg = read_checkpoint_and_config(args, args.checkpoint_path)
    device = select_device(args)
    maps_fn = torch_maps(build_model(args, cfg, payload, device), device, args.precision)
    writer = OutputWriter(args.save_path, args.threshold, args.save_maps)
    names = unique_names(paths)
    rows, failed = [], []
    results = predict_paths(paths, maps_fn, cfg.image_size, args.batch_size, args.num_workers)
    for result in tqdm(results, total=len(paths), desc="predict", unit="image"):
        if isinstance(result, Prediction):
            writer.write(names[result.index], result)
            rows.append(result.row())
        else:
            print(f"warning: skipped {result.path}: cannot read it ({result.reason})",
                  file=sys.stderr)
            failed.append(str(result.path))
    writer.write_scores(rows)
    return rows, failed


def main(argv=None) -> int:
    try:
        rows, failed = predict(parse_args(argv))
    except INPUT_ERRORS as e:
        return fail(e)
    print(f"{len(rows)} images segmented, {len(failed)} skipped")
    for path in failed:
        print(f"  skipped: {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
