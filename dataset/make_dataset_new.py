"""Convert an original dataset into the standardized layout (docs/reproduction.md §9).

    python dataset/make_dataset_new.py --dataset mvtec --src_path <original root> \\
        --dst_path ./dataset/mvisa/data

writes ``<dst_path>/<dataset>/<product>/{train/good, test/good, test/anomaly,
ground_truth/anomaly}``.  The whole source is checked first (one error lists every missing
product, folder, CSV or mask, and nothing is written); the output is built in a hidden sibling
folder and renamed into place, so a re-run replaces the old folder in one step.  Then run
``dataset/make_meta.py`` for the meta file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script from anywhere: make `dataset.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.convert import convert  # noqa: E402
from dataset.layouts import LAYOUTS  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.paths import DEFAULT_DATA  # noqa: E402

DEFAULT_DST = DEFAULT_DATA


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True,
                        help="dataset name = output folder and file-name prefix (letters, digits, "
                             "'-'; no '_'): mvtec, visa, btad, mpdd, dtd, or any name "
                             "with --layout")
    parser.add_argument("--src_path", required=True, help="root of the original dataset")
    parser.add_argument("--dst_path", default=DEFAULT_DST,
                        help=f"standardized data root (default {DEFAULT_DST})")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="source layout (default: implied by --dataset; required for "
                             "other names)")
    parser.add_argument("--mask_threshold", type=int, default=None,
                        help="mask value > this is anomalous (mvtec_like/btad/folder only; "
                             "default 128)")
    parser.add_argument("--allow_missing_masks", action="store_true",
                        help="folder layout: give anomalous images without a mask an all-zero mask")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message for bad input)."""
    args = parse_args(argv)
    try:
        out = convert(args.dataset, args.src_path, args.dst_path, args.layout,
                      args.mask_threshold, args.allow_missing_masks)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out}\nnext: python dataset/make_meta.py --data_path {args.dst_path} "
          f"--dataset {args.dataset}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
