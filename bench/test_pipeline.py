"""End-to-end test.py on a generated standardized dataset: wall time per stage and peak memory of
ours, against the metric and image stages written the reference's way (every map of the dataset
held until the end, scikit-learn called per metric, the per-threshold AUPRO loop, panels written
one by one in the main thread).

    python bench/test_pipeline.py                      # 4 products x 50 images at 518 px
    python bench/test_pipeline.py --products 2 --images 4 --size 112     # a smoke run

The last line is the ratio of the (metrics + panels) wall times: ``speedup: 12.3x``.
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
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import test as test_script  # noqa: E402
from bench.forward import evenly_spaced_layers  # noqa: E402
from bench.naive_metrics import naive_evaluate_product  # noqa: E402
from dataset.make_dataset_new import convert  # noqa: E402
from dataset.make_meta import write_meta  # noqa: E402
from dataset.synthetic import SOURCES, write_product  # noqa: E402
from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip, save_checkpoint  # noqa: E402
from utils.data import AnomalyDataset  # noqa: E402
from utils.metrics import product_maps  # noqa: E402
from utils.random_clip import write_openai_archive  # noqa: E402
from utils.visualize import save_panel  # noqa: E402

NAME = "bench"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--products", type=int, default=4)
    p.add_argument("--images", type=int, default=50, help="test images per product (1/2 anomalous)")
    p.add_argument("--size", type=int, default=518, help="image size (a multiple of 14)")
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--work_dir", default=None, help="default: a temporary folder")
    return p.parse_args(argv)


def make_inputs(work: Path, args) -> tuple[Path, Path, Path]:
    """Dataset (through the real conversion path), random CLIP archive, random VCP checkpoint."""
    src = work / "src"
    for product in list(SOURCES)[:args.products]:
        write_product(src, product, args.images // 2, args.images - args.images // 2,
                      args.size, seed=0)
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


def ours(work: Path, data: Path, archive: Path, checkpoint: Path, device: str):
    argv = ["--data_path", str(data), "--dataset", NAME, "--checkpoint_path", str(checkpoint),
            "--pretrained_path", str(archive), "--save_path", str(work / "ours"),
            "--device", device, "--num_workers", "2", "--batch_size", "8"]
    tracemalloc.start()
    start = time.perf_counter()
    evaluator = test_script.run(test_script.parse_args(argv))
    wall = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return evaluator, wall, peak


def reference_way(work: Path, data: Path, maps: dict) -> tuple[float, float, int]:
    """Metrics and panels as the reference does them, on maps already held for the whole set."""
    dataset = AnomalyDataset(data, NAME, "test", image_size=next(iter(maps.values()))[0].shape[-1])
    tracemalloc.start()
    held = {p: tuple(np.array(a) for a in arrays) for p, arrays in maps.items()}  # all maps kept
    start = time.perf_counter()
    for product, (raw, new, masks, labels) in held.items():
        naive_evaluate_product(raw, new, masks, labels)
    metrics = time.perf_counter() - start
    normalized = {p: product_maps(raw, new)[0] for p, (raw, new, _, _) in held.items()}
    start = time.perf_counter()
    for product, (raw, new, masks, labels) in held.items():
        pixel_maps = normalized[product]
        for i, idx in enumerate(dataset.product_ranges[product]):
            rel = dataset.entries[idx]["img_path"]
            image = np.asarray(Image.open(data / rel).convert("RGB")
                               .resize(pixel_maps[i].shape[::-1]))
            save_panel(work / "reference" / product / f"{Path(rel).stem}.png", image,
                       pixel_maps[i], masks[i], 0.5)
    panels = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return metrics, panels, peak


def collect_maps(data: Path, archive: Path, checkpoint: Path, size: int, device: str) -> dict:
    """Every product's raw/new maps, masks and labels (the reference's in-memory lists)."""
    from model import build_vcp_clip, checkpoint_configs, read_checkpoint
    cfg = checkpoint_configs(read_checkpoint(checkpoint))[0]
    model = build_vcp_clip(archive, cfg, checkpoint=checkpoint).to(device)
    dataset = AnomalyDataset(data, NAME, "test", image_size=size)
    out = {}
    for product, indices in dataset.product_ranges.items():
        items = [dataset[i] for i in indices]
        images = torch.stack([x["image"] for x in items])
        with torch.inference_mode():
            maps = [model(b.to(device)).abnormal() for b in images.split(8)]
        raw, new = (torch.cat([m[k] for m in maps]).float().cpu() for k in (0, 1))
        out[product] = (raw.numpy(), new.numpy(),
                        np.stack([x["mask"][0].numpy() > 0.5 for x in items]),
                        np.array([x["anomaly"] for x in items]))
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        data, archive, checkpoint = make_inputs(work, args)
        evaluator, wall, peak = ours(work, data, archive, checkpoint, args.device)
        s = evaluator.seconds
        n = sum(len(r) for r in AnomalyDataset(data, NAME, "test", image_size=args.size)
                .product_ranges.values())
        print(f"\n{args.products} products, {n} images at {args.size} px, {Path(args.config).stem} "
              f"backbone on {args.device}")
        print(f"ours: wall {wall:.1f} s; forward {s['forward']:.1f} s, metrics {s['metrics']:.1f} s, "
              f"panels {s['panels']:.1f} s CPU in 4 threads ({s['panels_wait']:.1f} s waited); "
              f"peak traced memory {peak / 2**20:.0f} MiB")
        maps = collect_maps(data, archive, checkpoint, args.size, args.device)
        metrics, panels, ref_peak = reference_way(work, data, maps)
        print(f"reference way: metrics {metrics:.1f} s, panels {panels:.1f} s; peak traced memory "
              f"{ref_peak / 2**20:.0f} MiB (all maps held)")
        ours_stages = s["metrics"] + s["panels"]  # the threads' CPU time, not the shorter wait
        print(f"metrics + panels: ours {ours_stages:.2f} s, reference way {metrics + panels:.2f} s")
        print(f"speedup: {(metrics + panels) / ours_stages:.1f}x")


if __name__ == "__main__":
    main()
