"""Zero-shot test (SPEC §10-11): per-product pixel and image metrics, the pipe table, heat maps.

    python test.py --dataset mvtec --checkpoint_path ./vcp_weight/train_visa.pth

Products are evaluated as the loader reaches them (they are contiguous in a meta file): a
product's metrics run in a background thread while the model runs on the next product, so the
metrics keep up with the forward pass and memory holds the products in flight, never the dataset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, at_least, autocast,
                       build_model, check_output_folder, fail, read_checkpoint_and_config,
                       seed_everything, select_device)
from utils.data import AnomalyDataset, DataError
from utils.files import atomic_write
from utils.metrics import evaluate_product, format_table, mean_row
from utils.visualize import save_panel


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Zero-shot anomaly segmentation test of VCP-CLIP")
    p.add_argument("--data_path", default="./dataset/mvisa/data", help="standardized data root")
    p.add_argument("--save_path", default="./results/test", help="log.txt, metrics.json, imgs/")
    p.add_argument("--checkpoint_path", default="./vcp_weight/train_visa.pth")
    p.add_argument("--dataset", default="mvtec", help="NAME of <data_path>/meta_NAME.json")
    p.add_argument("--seed", type=at_least(0), default=111)
    add_model_flags(p)
    g = p.add_argument_group("speed (ours)")
    g.add_argument("--batch_size", type=at_least(1), default=8)
    g.add_argument("--num_workers", type=at_least(0), default=2)
    g.add_argument("--no_vis", action="store_true", help="skip the heat-map panels")
    return p.parse_args(argv)


@dataclass
class Product:
    """The maps of one product, gathered image by image."""

    name: str
    raw: list = field(default_factory=list)  # [S,S] float32 each
    new: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # [S,S] bool
    labels: list = field(default_factory=list)
    paths: list = field(default_factory=list)


def metric_threads() -> int:
    """Products whose metrics run at once: 1 on a small machine, up to 4 with many cores
    (NumPy's sorts and SciPy's filters release the GIL)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


class Evaluator:
    """Finishes each product when the next one starts: its metrics in a background thread while
    the model runs on the next products, then its panels in writer threads. Rows are collected
    in product order; memory holds the products in flight, never the dataset."""

    def __init__(self, data_root: Path, save_path: Path, visualize: bool,
                 threads: int | None = None):
        self.data_root, self.save_path, self.visualize = data_root, save_path, visualize
        self.rows: dict[str, dict] = {}
        # seconds per stage; "metrics" and "panels" are the background threads' own time,
        # "metrics_wait" / "panels_wait" the wall time the main thread waited for them
        self.seconds = {"forward": 0.0, "metrics": 0.0, "metrics_wait": 0.0, "panels": 0.0,
                        "panels_wait": 0.0}
        self.current: Product | None = None
        self.seen: set[str] = set()
        self.threads = threads or metric_threads()
        self.metrics = ThreadPoolExecutor(max_workers=self.threads)
        self.jobs: deque = deque()  # (product, future of (row, seconds, panel futures)), in order
        self.writer = ThreadPoolExecutor(max_workers=4) if visualize else None
        self.panels = []  # the last collected product's panel futures

    def add(self, product, raw, new, mask, label, path) -> None:
        if self.current is None or self.current.name != product:
            self.finish()
            if product in self.seen:
                raise DataError(f"product {product!r} is not contiguous in the meta file")
            self.seen.add(product)
            self.current = Product(product)
        c = self.current
        c.raw.append(raw), c.new.append(new), c.masks.append(mask)
        c.labels.append(label), c.paths.append(path)

    def finish(self) -> None:
        """Hands the current product to a metrics thread, once one is free."""
        c, self.current = self.current, None
        if c is None:
            return
        while len(self.jobs) >= self.threads:
            self._collect()
        self.jobs.append((c.name, self.metrics.submit(self._evaluate, c)))

    def _evaluate(self, c: Product) -> tuple[dict, float, list]:
        """Metrics of one product, then its panels handed to the writers (metrics thread)."""
        start = time.perf_counter()
        masks = np.stack(c.masks)
        row, pixel_maps = evaluate_product(np.stack(c.raw), np.stack(c.new), masks,
                                           np.asarray(c.labels), c.name)
        seconds = time.perf_counter() - start
        panels = [self.writer.submit(self._panel, c.name, path, label, amap, mask,
                                     row["threshold"])
                  for path, amap, mask, label in zip(c.paths, pixel_maps, masks, c.labels)
                  ] if self.writer else []
        return row, seconds, panels

    def _collect(self) -> None:
        """The oldest product's row (re-raising what its thread raised); then waits for the
        panels of the product before it, so at most two products' panels are pending."""
        start = time.perf_counter()
        name, job = self.jobs.popleft()
        row, seconds, panels = job.result()
        self.rows[name] = row
        self.seconds["metrics"] += seconds
        self.seconds["metrics_wait"] += time.perf_counter() - start
        self._wait_for_panels()
        self.panels = panels

    def _panel(self, product: str, rel_path: str, label: int, amap: np.ndarray,
               mask: np.ndarray, threshold: float) -> float:
        """Write one panel; returns the CPU seconds this thread spent on it."""
        start = time.thread_time()
        image = Image.open(self.data_root / rel_path).convert("RGB").resize(amap.shape[::-1])
        state = "anomaly" if label else "good"
        out = self.save_path / "imgs" / product / state / f"vis_zong_{Path(rel_path).stem}.png"
        save_panel(out, np.asarray(image), amap, mask, threshold)
        return time.thread_time() - start

    def _wait_for_panels(self) -> None:
        start = time.perf_counter()
        self.seconds["panels"] += sum(job.result() for job in self.panels)
        self.panels = []
        self.seconds["panels_wait"] += time.perf_counter() - start

    def close(self) -> None:
        try:
            self.finish()
            while self.jobs:
                self._collect()
            self._wait_for_panels()
        finally:
            self.metrics.shutdown(cancel_futures=True)
            if self.writer:
                self.writer.shutdown(cancel_futures=True)


def write_results(rows: dict, save_path: Path, header: str) -> str:
    table = format_table(rows)
    save_path.mkdir(parents=True, exist_ok=True)
    with open(save_path / "log.txt", "a") as log:
        log.write(f"{header}\n{table}\n")
    keys = list(next(iter(rows.values()), {}))
    payload = {"products": rows, "mean": mean_row(rows, keys)}
    atomic_write(save_path / "metrics.json", json.dumps(payload, indent=2))
    return table


def run(args: argparse.Namespace) -> Evaluator:
    seed_everything(args.seed)
    # everything that can be wrong with the inputs fails here, before any model work
    payload, cfg = read_checkpoint_and_config(args, args.checkpoint_path)
    dataset = AnomalyDataset(args.data_path, args.dataset, "test", image_size=cfg.image_size)
    check_output_folder(args.save_path, "--save_path")
    device = select_device(args)
    model = build_model(args, cfg, payload, device, args.checkpoint_path)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda")
    save_path = Path(args.save_path)
    evaluator = Evaluator(Path(args.data_path), save_path, not args.no_vis)
    start = time.time()
    with torch.inference_mode(), autocast(device, args.precision):
        for batch in tqdm(loader, desc=f"test {args.dataset}", unit="batch"):
            tick = time.perf_counter()
            raw, new = model(batch["image"].to(device, non_blocking=True)).abnormal()
            raw, new = raw.float().cpu().numpy(), new.float().cpu().numpy()
            evaluator.seconds["forward"] += time.perf_counter() - tick
            masks = batch["mask"][:, 0].numpy() > 0.5
            for i, product in enumerate(batch["product"]):
                evaluator.add(product, raw[i], new[i], masks[i], int(batch["anomaly"][i]),
                              batch["path"][i])
    evaluator.close()
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in evaluator.seconds.items())
    header = (f"dataset {args.dataset}, checkpoint {args.checkpoint_path}, "
              f"{len(dataset)} images, {time.time() - start:.1f} s ({stages})")
    print(write_results(evaluator.rows, save_path, header))
    return evaluator


def main(argv=None) -> int:
    try:
        run(parse_args(argv))
    except INPUT_ERRORS as e:
        return fail(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
