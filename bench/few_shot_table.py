"""The tables of docs/scoring.md: the test protocol in every scoring mode on one dataset, one
markdown row per mode (mean over products) with the time per image.

    python bench/few_shot_table.py --data_path demo_output/data --dataset demotarget \
        --checkpoint_path demo_output/checkpoints/epoch_12_group_id_2.pth \
        --pretrained_path demo_output/clip_demo.pt --config_path configs/demo.json

The model is built once. Modes: zero-shot; for each K of ``--shots`` (a number or ``all``), the
reference map fused by each rule of ``--fusions`` (the default first) and alone; for each K of
``--coreset_shots`` the same with the memory subsampled to a greedy coreset of ``--coreset``;
MuSc (``--mutual``, its default settings) likewise. Time per image = (forward + patch scoring,
the references' forwards and coreset included) / images, from the evaluation's own stage timer
(metrics and panels are the same work in every mode), the patch scoring's part of it, and the
time as a multiple of zero-shot's in the same run (after one untimed warm-up batch).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils.cli import (ArgumentParser, add_model_flags, at_least, device_of,  # noqa: E402
                       model_source, shot_count, shots)
from utils.data.dataset import AnomalyDataset, choose_references  # noqa: E402
from utils.device import seed_everything  # noqa: E402
from utils.evaluation.protocol import evaluate  # noqa: E402
from utils.evaluation.metrics import mean_row  # noqa: E402
from utils.inference.runtime import TorchRuntime  # noqa: E402
from utils.scoring import FUSIONS, Context, make_strategy  # noqa: E402

COLUMNS = (("auroc_px", "pixel AUROC"), ("aupro_px", "AUPRO"), ("ap_px", "pixel AP"),
           ("auroc_sp", "image AUROC"), ("ap_sp", "image AP"))


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint_path", required=True)
    p.add_argument("--seed", type=at_least(0), default=111)
    p.add_argument("--batch_size", type=at_least(1), default=8)
    p.add_argument("--num_workers", type=at_least(0), default=0)
    add_model_flags(p)
    g = p.add_argument_group("the table")
    g.add_argument("--shots", type=shots, nargs="*", default=[1, 4, "all"])
    g.add_argument("--coreset_shots", type=shots, nargs="*", default=["all"],
                   help="the K of the rows with a coreset memory (default all)")
    g.add_argument("--coreset", type=float, default=0.1, help="their ratio (default 0.1)")
    g.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=FUSIONS)
    g.add_argument("--no_mutual", action="store_true")
    return p.parse_args(argv)


def modes(args) -> list[tuple[str, str, int | str, str, dict]]:
    """(row label, strategy, K, fusion, its settings) per mode."""
    out = [("zero-shot", "zero_shot", 0, FUSIONS[0], {})]
    for k in args.shots:
        out += [(f"K={k}, {f}", "reference", k, f, {}) for f in args.fusions]
    for k in args.coreset_shots:
        out += [(f"K={k}, coreset {args.coreset:g}, {f}", "reference", k, f,
                 {"coreset": args.coreset}) for f in args.fusions]
    if not args.no_mutual:
        out += [(f"MuSc, {f}", "mutual", 0, f, {}) for f in args.fusions]
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    device = device_of(args)
    runtime = TorchRuntime.load(model_source(args, args.checkpoint_path), device, args.precision)
    dataset = AnomalyDataset(args.data_path, args.dataset, "test", image_size=runtime.image_size)
    root = Path(args.data_path)
    runtime(torch.stack([dataset[i]["image"] for i in range(min(args.batch_size,
                                                                 len(dataset)))]))  # warm-up
    print("| scoring | " + " | ".join(name for _, name in COLUMNS)
          + " | ms / image | of it scoring | × zero-shot |")
    print("|---|" + "---:|" * (len(COLUMNS) + 3), flush=True)
    zero_ms = None
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, name, k, fusion, settings) in enumerate(modes(args)):
            chosen = (choose_references(root, args.dataset, dataset.products, shot_count(k),
                                        args.seed) if k else {})
            context = Context(runtime, runtime.image_size,
                              lambda product: [root / p for p in chosen[product]],
                              args.batch_size)
            strategy = make_strategy(name, settings, context, fusion)
            evaluator = evaluate(runtime, dataset, Path(tmp) / str(i), strategy,
                                 args.batch_size, args.num_workers, visualize=False)
            mean = mean_row(evaluator.rows, [key for key, _ in COLUMNS])
            scoring = evaluator.seconds.get("patch_scoring", 0.0)
            cells = [f"{100 * mean[key]:.1f}" for key, _ in COLUMNS]
            ms = 1000 * (evaluator.seconds["forward"] + scoring) / evaluator.images
            zero_ms = zero_ms or ms  # the first row's, zero-shot
            print(f"| {label} | " + " | ".join(cells) + f" | {ms:.1f} | "
                  f"{1000 * scoring / evaluator.images:.1f} | {ms / zero_ms:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
