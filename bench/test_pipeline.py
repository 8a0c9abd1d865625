"""End-to-end test.py at dataset scale against the reference's way, on a generated dataset of
MVTec-AD's shape (15 products, 115 test images each, 73 % of them anomalous).

    python bench/test_pipeline.py                                  # 15 x 115 images at 518 px
    python bench/test_pipeline.py --products 2 --images 4 --size 56     # a smoke run
    python bench/test_pipeline.py --config configs/ViT-L-14-336.json --device cuda   # a GPU

Three runs over the same data, model and loader settings:
  * forward only: the loader and the model, nothing else (the floor for the end-to-end time);
  * ours: ``test.py`` as it runs (product metrics in a thread overlapping the next product's
    forward pass, panels in writer threads);
  * the reference's way: one image per forward pass with the text encoder called per image and
    template, every map of the dataset held until the end, then per product scikit-learn's
    metrics called one by one, the per-threshold AUPRO loop and the panels written one by one.
Prints the wall times, end-to-end / forward-only, and peak traced (NumPy / Python) memory.
The last line is the reference's way / ours, end to end: ``speedup: <ratio>x`` (not printed with
``--no_reference``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import evenly_spaced_layers, per_image_text  # noqa: E402
from tests.helpers.naive_metrics import naive_evaluate_product, naive_product_maps  # noqa: E402
from dataset.convert import convert  # noqa: E402
from dataset.meta import write_meta  # noqa: E402
from dataset.synthetic import SOURCES, write_product  # noqa: E402
from model import (CLIPConfig, VCPCLIP, VCPConfig, build_vcp_clip, checkpoint_configs,  # noqa: E402
                   load_clip, read_checkpoint, save_checkpoint)
from utils.device import autocast  # noqa: E402
from utils.data.dataset import AnomalyDataset  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.evaluation.protocol import evaluate, write_results  # noqa: E402
from utils.inference.runtime import ModelSource, TorchRuntime  # noqa: E402
from tests.helpers.random_clip import write_openai_archive  # noqa: E402
from utils.evaluation.visualize import save_panel  # noqa: E402

NAME = "bench"
BATCH, WORKERS = 8, 2  # test.py's defaults, used by the forward-only and ours runs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--products", type=int, default=15, help=f"at most {len(SOURCES)}")
    p.add_argument("--images", type=int, default=115, help="test images per product")
    p.add_argument("--anomalous", type=float, default=0.73,
                   help="fraction of anomalous test images (MVTec-AD: 1,258 of 1,725)")
    p.add_argument("--size", type=int, default=518, help="image size (a multiple of 14)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "fp16", "bf16"],
                   help="test.py's --precision (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--work_dir", default=None, help="default: a temporary folder")
    p.add_argument("--no_reference", action="store_true",
                   help="only forward-only and ours (e.g. peak memory against --products)")
    args = p.parse_args(argv)
    if not 1 <= args.products <= len(SOURCES):
        p.error(f"--products: expected 1 to {len(SOURCES)}, got {args.products}")
    return args


def make_inputs(work: Path, args) -> tuple[Path, Path, Path]:
    """Dataset (through the real conversion path), random CLIP archive, random VCP checkpoint."""
    src = work / "src"
    n_bad = int(round(args.images * args.anomalous))
    for product in list(SOURCES)[:args.products]:
        write_product(src, product, args.images - n_bad, n_bad, args.size, seed=0)
    data = work / "data"
    convert(NAME, src, data, layout="folder", progress=False)
    write_meta(data, NAME)
    cfg = CLIPConfig.from_json(args.config)
    archive = write_openai_archive(cfg, work / "clip.pt")
    vcp = VCPConfig(features_list=evenly_spaced_layers(cfg.vision_layers),
                    image_size=args.size, total_d_layer_len=cfg.text_layers - 1)
    torch.manual_seed(0)
    checkpoint = work / "vcp.pth"
    save_checkpoint(VCPCLIP(load_clip(archive, args.size), vcp), checkpoint)
    return data, archive, checkpoint


def ours(work: Path, data: Path, archive: Path, checkpoint: Path, args):
    """What test.py does, through the library: the model, the evaluation, the table."""
    device = select_device(args.device)
    runtime = TorchRuntime.load(ModelSource(str(checkpoint), str(archive)), device, args.precision)
    dataset = AnomalyDataset(data, NAME, "test", image_size=runtime.image_size)
    evaluator = evaluate(runtime, dataset, work / "ours", batch_size=BATCH, num_workers=WORKERS,
                         pin_memory=device.type == "cuda")
    write_results(evaluator.rows, work / "ours", f"dataset {NAME}")
    return evaluator


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_only(data: Path, archive: Path, checkpoint: Path, args) -> float:
    """Seconds for test.py's loader and forward pass alone (maps copied to the host)."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    device = torch.device(args.device)
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint).to(device).eval()
    loader = DataLoader(AnomalyDataset(data, NAME, "test", image_size=cfg.image_size),
                        batch_size=BATCH, num_workers=WORKERS, pin_memory=device.type == "cuda")
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast(device, args.precision):
        for batch in loader:
            raw, new = model(batch["image"].to(device, non_blocking=True)).abnormal()
            raw.float().cpu().numpy(), new.float().cpu().numpy()
    sync(device)
    return time.perf_counter() - start


def traced(fn, *args):
    """``(result, wall seconds, peak traced bytes)`` of one call."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        out = fn(*args)
    finally:
        wall = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, wall, peak


def reference_way(work: Path, data: Path, archive: Path, checkpoint: Path, args) -> dict:
    """Forward, metrics and panels the reference's way; seconds per stage."""
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    device = torch.device(args.device)
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint).to(device).eval()

    def encode_text(image_features):  # [B, E] -> [B, 2, E], one image and template per call
        feats = per_image_text(model, image_features)  # [B, S, E]
        states = feats.split(model.templates_per_state, dim=1)
        return torch.stack([F.normalize(s.mean(1), dim=-1) for s in states], dim=1)
    model.encode_text = encode_text
    dataset = AnomalyDataset(data, NAME, "test", image_size=cfg.image_size)
    seconds = {}
    start = time.perf_counter()
    held: dict[str, list] = {}  # product -> [(raw, new, mask, label, path)], all kept
    with torch.inference_mode(), autocast(device, args.precision):
        for i in range(len(dataset)):
            item = dataset[i]
            raw, new = model(item["image"][None].to(device)).abnormal()
            held.setdefault(item["product"], []).append(
                (raw[0].float().cpu().numpy(), new[0].float().cpu().numpy(),
                 item["mask"][0].numpy() > 0.5, item["anomaly"], item["path"]))
    sync(device)
    seconds["forward"] = time.perf_counter() - start
    start = time.perf_counter()
    maps = {}
    for product, items in held.items():
        raw, new, masks, labels = (np.stack([x[j] for x in items]) for j in range(4))
        naive_evaluate_product(raw, new, masks, labels)
        maps[product] = naive_product_maps(raw, new)[0]
    seconds["metrics"] = time.perf_counter() - start
    start = time.perf_counter()
    for product, items in held.items():
        for amap, (_, _, mask, _, rel) in zip(maps[product], items):
            image = Image.open(data / rel).convert("RGB").resize(amap.shape[::-1])
            save_panel(work / "reference" / product / f"{Path(rel).stem}.png", np.asarray(image),
                       amap, mask, 0.5)
    seconds["panels"] = time.perf_counter() - start
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data, archive, checkpoint = make_inputs(work, args)
        n = len(AnomalyDataset(data, NAME, "test", image_size=args.size))
        device = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        print(f"{args.products} products, {n} images at {args.size} px, {Path(args.config).stem} "
              f"backbone on {device}")
        forward = forward_only(data, archive, checkpoint, args)
        evaluator, wall, peak = traced(ours, work, data, archive, checkpoint, args)
        s = evaluator.seconds
        print(f"forward only: {forward:.1f} s")
        print(f"ours (test.py): {wall:.1f} s end to end = {wall / forward:.2f} x forward only; "
              f"in it forward {s['forward']:.1f} s, metrics {s['metrics']:.1f} s in a thread "
              f"({s['metrics_wait']:.1f} s waited), panels {s['panels']:.1f} s CPU in 4 threads "
              f"({s['panels_wait']:.1f} s waited); peak traced memory {peak / 2**20:.0f} MiB")
        if args.no_reference:
            return
        ref, ref_wall, ref_peak = traced(reference_way, work, data, archive, checkpoint, args)
        print(f"reference way: {ref_wall:.1f} s end to end; forward {ref['forward']:.1f} s, "
              f"metrics {ref['metrics']:.1f} s, panels {ref['panels']:.1f} s; peak traced memory "
              f"{ref_peak / 2**20:.0f} MiB (all maps held)")
        print(f"speedup: {ref_wall / wall:.1f}x")


if __name__ == "__main__":
    main()
