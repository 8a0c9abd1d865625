"""Write ``<data_path>/meta_<dataset>.json`` for a standardized dataset (docs/reproduction.md §9).

    python dataset/make_meta.py --data_path ./dataset/mvisa/data --dataset mvtec

Format: ``{"train": {product: [entry, ...]}, "test": {product: [entry, ...]}}`` with products
in the fixed order for ``mvtec`` / ``visa`` (sorted folder names for any other dataset), entries
ordered by sorted folder name (``anomaly`` before ``good``) then sorted file name, and each entry
``{img_path, mask_path, cls_name, specie_name, dataset_name, anomaly}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a script from anywhere: make `dataset.` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataset.meta import write_meta  # noqa: E402
from utils.errors import DataError  # noqa: E402
from utils.paths import DEFAULT_DATA  # noqa: E402

DEFAULT_DATA_PATH = DEFAULT_DATA


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_path", default=DEFAULT_DATA_PATH,
                        help=f"standardized data root (default {DEFAULT_DATA_PATH})")
    parser.add_argument("--dataset", required=True,
                        help="dataset folder under --data_path (mvtec, visa, btad, ...)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (1 with a message for bad input)."""
    args = parse_args(argv)
    try:
        path = write_meta(args.data_path, args.dataset)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
