"""The README's table 'Few-shot and mutual scoring': test.py run in every scoring mode on one
dataset, one markdown row per mode (mean over products) with the time per image.

    python bench/few_shot_table.py --data_path demo_output/data --dataset demotarget \
        --checkpoint_path demo_output/checkpoints/epoch_30_group_id_2.pth \
        --pretrained_path demo_output/clip_demo.pt --config_path configs/demo.json

It takes test.py's flags (those of the scoring are set per mode). Modes: zero-shot; for each K of
``--shots``, the reference map fused by each rule of ``--fusions`` (the default first) and alone;
mutual scoring likewise. Time per image = (forward + patch scoring) / images, from test.py's own
stage timer (metrics and panels are the same work in every mode).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import test as test_script  # noqa: E402
from utils.metrics import FUSIONS  # noqa: E402

COLUMNS = (("auroc_px", "pixel AUROC"), ("aupro_px", "AUPRO"), ("ap_px", "pixel AP"),
           ("auroc_sp", "image AUROC"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                parents=[test_script.build_parser(add_help=False)])
    g = p.add_argument_group("the table")
    g.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    g.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    g.add_argument("--no_mutual", action="store_true")
    return p.parse_args(argv)


def modes(args) -> list[tuple[str, dict]]:
    """(row label, test.py flags) per mode."""
    out = [("zero-shot", {})]
    for k in args.shots:
        out += [(f"K={k}, {f}", {"k_shot": k, "fusion": f}) for f in args.fusions]
    if not args.no_mutual:
        out += [(f"mutual, {f}", {"mutual": True, "fusion": f}) for f in args.fusions]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    print("| scoring | " + " | ".join(name for _, name in COLUMNS) + " | ms / image |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, flags) in enumerate(modes(args)):
            out = Path(tmp) / str(i)
            mode = argparse.Namespace(**{**vars(args), "k_shot": 0, "mutual": False,
                                         "no_vis": True, "save_path": str(out), **flags})
            with contextlib.redirect_stdout(sys.stderr):  # test.py's own table
                evaluator = test_script.run(mode)
            mean = json.loads((out / "metrics.json").read_text())["mean"]
            seconds = evaluator.seconds["forward"] + evaluator.seconds.get("patch_scoring", 0.0)
            cells = [f"{100 * mean[key]:.1f}" for key, _ in COLUMNS]
            ms = 1000 * seconds / evaluator.images
            print(f"| {label} | " + " | ".join(cells) + f" | {ms:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
