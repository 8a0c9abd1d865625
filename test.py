"""Zero-shot test (SPEC §10-11): per-product pixel and image metrics, the pipe table, heat maps.

    python test.py --dataset mvtec --checkpoint_path ./vcp_weight/train_visa.pth

Products are evaluated as the loader reaches them (they are contiguous in a meta file): a
product's metrics run in a background thread while the model runs on the next product, so the
metrics keep up with the forward pass and memory holds the products in flight, never the dataset.

Beyond zero-shot (ours; README, 'Few-shot and mutual scoring'): ``--k_shot K`` compares every test
patch with the patches of K normal images of the product's train split, ``--mutual`` with those
of the product's other test images; the patch-score map is fused with each zero-shot branch
(``--fusion``) before the protocol's smoothing, normalization and metrics. Without these flags
the numbers are the paper's zero-shot ones, bit for bit.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from model.patch_scoring import MUTUAL_FRACTION, mutual_score, reference_score, score_map
from utils.cli import (INPUT_ERRORS, ArgumentParser, UsageError, add_model_flags, at_least,
                       autocast, build_model, changed_keys, check_output_folder, fail,
                       read_checkpoint_and_config, run_flags, seed_everything, select_device)
from utils.data import AnomalyDataset, DataError, choose_references
from utils.files import atomic_write
from utils.metrics import FUSIONS, evaluate_product, format_table, fuse_maps, mean_row
from utils.prediction import memory_of
from utils.visualize import save_panel


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = ArgumentParser(description="Zero-shot anomaly segmentation test of VCP-CLIP",
                       add_help=add_help)
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
    g = p.add_argument_group("runs that never lose work (ours)")
    g.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run in --save_path after the products its "
                        f"{PROGRESS} lists (same flags)")
    g = p.add_argument_group("beyond zero-shot (ours)")
    g.add_argument("--k_shot", type=at_least(0), default=0,
                   help="K normal train images per product as references (default 0: zero-shot)")
    g.add_argument("--mutual", action="store_true",
                   help="score each test image against the product's other test images")
    g.add_argument("--mutual_fraction", type=float, default=MUTUAL_FRACTION,
                   help="mutual score: mean of this smallest fraction of the nearest distances "
                        "to the other images (default %(default)s, MuSc's)")
    g.add_argument("--fusion", choices=FUSIONS, default=FUSIONS[0],
                   help="how the patch-score map joins the zero-shot maps (default %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


PROGRESS = "progress.json"  # the finished products' rows while a run is on
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


def first_to_read(dataset: AnomalyDataset, done: dict, batch_size: int) -> int:
    """The first image the loader reads when the products in ``done`` are finished: the start of
    the batch, as an uninterrupted run batches them, that holds the first unfinished product's
    first image (so every image meets the same batch and gets the same numbers)."""
    todo = [r.start for p, r in dataset.product_ranges.items() if p not in done]
    return todo[0] // batch_size * batch_size if todo else len(dataset)


def check_scoring_flags(args: argparse.Namespace) -> None:
    if args.k_shot and args.mutual:
        raise UsageError("--k_shot and --mutual: choose one")
    if not 0 < args.mutual_fraction <= 1:
        raise UsageError(f"--mutual_fraction must be in (0, 1], got {args.mutual_fraction}")


@dataclass
class Product:
    """The maps of one product, gathered image by image."""

    name: str
    raw: list = field(default_factory=list)  # [S,S] float32 each
    new: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # [S,S] bool
    labels: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    patch: list = field(default_factory=list)  # [S,S] float32 patch-score maps
    tokens: list = field(default_factory=list)  # per image, per layer [L,W] (--mutual)


def metric_threads() -> int:
    """Products whose metrics run at once: half the cores, 1 to 8 (NumPy's sorts and SciPy's
    filters release the GIL: 2 products in 2 threads are 1.62x faster than one after the other
    on 2 cores, ``bench/metrics.py``). A product's metrics take 30-50 ms of CPU per image at
    518 px, so 8 threads should keep up with a GPU's ~300 images/s where 4 would not; each holds
    one product's maps."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))


class Evaluator:
    """Finishes each product when the next one starts: its metrics in a background thread while
    the model runs on the next products, then its panels in writer threads. Rows are collected
    in product order; memory holds the products in flight, never the dataset."""

    def __init__(self, data_root: Path, save_path: Path, visualize: bool,
                 threads: int | None = None, fusion: str | None = None,
                 mutual_fraction: float = MUTUAL_FRACTION, run: dict | None = None,
                 done: dict[str, dict] | None = None):
        self.data_root, self.save_path, self.visualize = data_root, save_path, visualize
        self.fusion = fusion  # how a patch-score map joins the zero-shot maps, if there is one
        self.mutual_fraction = mutual_fraction
        self.run = run  # run_flags of the flags, for the progress file
        self.rows: dict[str, dict] = dict(done or {})  # finished products, in meta-file order
        self.done = set(self.rows)  # finished by an earlier run (--resume): their images skipped
        self.images = 0
        # seconds per stage; "metrics" and "panels" are the background threads' own time,
        # "metrics_wait" / "panels_wait" the wall time the main thread waited for them
        self.seconds = {"forward": 0.0, "metrics": 0.0, "metrics_wait": 0.0, "panels": 0.0,
                        "panels_wait": 0.0}
        if fusion:
            self.seconds["patch_scoring"] = 0.0
        self.current: Product | None = None
        self.seen: set[str] = set()
        self.threads = threads or metric_threads()
        self.metrics = ThreadPoolExecutor(max_workers=self.threads)
        self.jobs: deque = deque()  # (product, future of (row, seconds, panel futures)), in order
        self.writer = ThreadPoolExecutor(max_workers=4) if visualize else None
        self.panels = []  # the last collected product's panel futures

    def add(self, product, raw, new, mask, label, path, patch=None, tokens=None) -> None:
        """One test image; ``patch`` its reference score map [S,S], ``tokens`` its patch tokens
        per layer [L,W] (mutual scoring waits for the whole product)."""
        if product in self.done:
            return
        if self.current is None or self.current.name != product:
            self.finish()
            if product in self.seen:
                raise DataError(f"product {product!r} is not contiguous in the meta file")
            self.seen.add(product)
            self.current = Product(product)
        c = self.current
        self.images += 1
        c.raw.append(raw), c.new.append(new), c.masks.append(mask)
        c.labels.append(label), c.paths.append(path)
        if patch is not None:
            c.patch.append(patch)
        if tokens is not None:
            c.tokens.append(tokens)

    def finish(self) -> None:
        """Hands the current product to a metrics thread, once one is free; with ``--mutual``
        its patches are scored first, here, so that one product's tokens are held at a time."""
        c, self.current = self.current, None
        if c is None:
            return
        self._mutual_scores(c)
        while len(self.jobs) >= self.threads:
            self._collect()
        self.jobs.append((c.name, self.metrics.submit(self._evaluate, c)))

    def _mutual_scores(self, c: Product) -> None:
        """The product's tokens -> its mutual score maps in ``c.patch`` (on the model's device)."""
        if not c.tokens:
            return
        start = time.perf_counter()
        size = c.raw[0].shape[-1]
        with torch.inference_mode():  # one stacked layer at a time: [N, L, W]
            layers = (torch.stack([t[i] for t in c.tokens]) for i in range(len(c.tokens[0])))
            scores = mutual_score(layers, self.mutual_fraction)  # [N, L]
            c.patch = list(score_map(scores, size).cpu().numpy())
        c.tokens = []
        self.seconds["patch_scoring"] += time.perf_counter() - start

    def _evaluate(self, c: Product) -> tuple[dict, float, list]:
        """Metrics of one product, then its panels handed to the writers (metrics thread)."""
        start = time.perf_counter()
        raw, new = np.stack(c.raw), np.stack(c.new)
        if c.patch:
            raw, new = fuse_maps(raw, new, np.stack(c.patch), self.fusion)
        masks = np.stack(c.masks)
        row, pixel_maps = evaluate_product(raw, new, masks, np.asarray(c.labels), c.name)
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
        if self.run is not None:
            atomic_write(self.save_path / PROGRESS,
                         json.dumps({"run": self.run, "products": self.rows}, indent=1))
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

    def close(self, failed: bool = False) -> None:
        """Finishes the products in flight and stops the threads. After a failure (``failed``)
        the product being read is dropped; the ones already handed over are still finished and
        recorded in the progress file, for ``--resume``."""
        try:
            if failed:
                self.current = None
            self.finish()
            while self.jobs:
                self._collect()
            self._wait_for_panels()
        finally:
            self.metrics.shutdown(cancel_futures=True)
            if self.writer:
                self.writer.shutdown(cancel_futures=True)


def write_results(rows: dict, save_path: Path, header: str, scoring: dict | None = None) -> str:
    """The table to log.txt (appended) and metrics.json; ``scoring`` says how maps were scored
    beyond zero-shot (and lists the reference images)."""
    table = format_table(rows)
    save_path.mkdir(parents=True, exist_ok=True)
    with open(save_path / "log.txt", "a") as log:
        log.write(f"{header}\n")
        if scoring:
            log.write(f"scoring: {json.dumps(scoring)}\n")
        log.write(f"{table}\n")
    keys = list(next(iter(rows.values()), {}))
    payload = {"products": rows, "mean": mean_row(rows, keys)}
    if scoring:
        payload["scoring"] = scoring
    atomic_write(save_path / "metrics.json", json.dumps(payload, indent=2))
    return table


def scoring_of(args: argparse.Namespace, references: dict) -> dict | None:
    """How the maps are scored beyond zero-shot (None: zero-shot)."""
    if args.k_shot:
        return {"k_shot": args.k_shot, "fusion": args.fusion, "references": references}
    if args.mutual:
        return {"mutual": True, "fusion": args.fusion, "fraction": args.mutual_fraction}
    return None


class ReferenceMaps:
    """Reference score maps of a batch; each product's memory is built from its chosen train
    images when its first test image arrives, and only the current product's is kept."""

    def __init__(self, references: dict[str, list[str]], build):
        self.references, self.build = references, build  # build(paths) -> memory
        self.product, self.memory = None, None

    def __call__(self, products: list[str], patch_tokens: list[torch.Tensor],
                 size: int) -> np.ndarray:
        out = np.empty((len(products), size, size), np.float32)  # [B, S, S]
        for product in dict.fromkeys(products):
            if product != self.product:
                self.product, self.memory = product, self.build(self.references[product])
            rows = [i for i, p in enumerate(products) if p == product]
            scores = reference_score([t[rows] for t in patch_tokens], self.memory)  # [b, L]
            out[rows] = score_map(scores, size).cpu().numpy()
        return out


def run(args: argparse.Namespace) -> Evaluator:
    seed_everything(args.seed)
    # everything that can be wrong with the inputs fails here, before any model work
    check_scoring_flags(args)
    payload, cfg = read_checkpoint_and_config(args, args.checkpoint_path)
    dataset = AnomalyDataset(args.data_path, args.dataset, "test", image_size=cfg.image_size)
    check_output_folder(args.save_path, "--save_path")
    references = (choose_references(args.data_path, args.dataset, dataset.products, args.k_shot,
                                    args.seed) if args.k_shot else {})
    done = resumed_rows(args)
    device = select_device(args)
    model = build_model(args, cfg, payload, device, args.checkpoint_path)
    first = first_to_read(dataset, done, args.batch_size)
    loader = DataLoader(Subset(dataset, range(first, len(dataset))), batch_size=args.batch_size,
                        shuffle=False, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    save_path = Path(args.save_path)
    scoring = scoring_of(args, references)
    evaluator = Evaluator(Path(args.data_path), save_path, not args.no_vis,
                          fusion=args.fusion if scoring else None,
                          mutual_fraction=args.mutual_fraction, run=run_flags(args, NOT_IN_RUN),
                          done=done)
    root = Path(args.data_path)
    reference_maps = ReferenceMaps(references, lambda paths: memory_of(
        [root / p for p in paths], model, device, args.precision, cfg.image_size,
        args.batch_size)) if references else None
    start = time.time()
    try:
        with torch.inference_mode(), autocast(device, args.precision):
            for batch in tqdm(loader, desc=f"test {args.dataset}", unit="batch"):
                tick = time.perf_counter()
                maps = model(batch["image"].to(device, non_blocking=True))
                raw, new = (m.float().cpu().numpy() for m in maps.abnormal())
                evaluator.seconds["forward"] += time.perf_counter() - tick
                patch = None
                if reference_maps:
                    tick = time.perf_counter()
                    patch = reference_maps(batch["product"], maps.patch_tokens, raw.shape[-1])
                    evaluator.seconds["patch_scoring"] += time.perf_counter() - tick
                masks = batch["mask"][:, 0].numpy() > 0.5
                for i, product in enumerate(batch["product"]):
                    evaluator.add(product, raw[i], new[i], masks[i], int(batch["anomaly"][i]),
                                  batch["path"][i], None if patch is None else patch[i],
                                  [t[i] for t in maps.patch_tokens] if args.mutual else None)
    except BaseException:  # an unreadable image, Ctrl-C: keep the products already handed over
        with contextlib.suppress(Exception):  # a second failure must not hide the first
            evaluator.close(failed=True)
        raise
    evaluator.close()
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in evaluator.seconds.items())
    header = (f"dataset {args.dataset}, checkpoint {args.checkpoint_path}, "
              f"{len(dataset)} images, {time.time() - start:.1f} s ({stages})")
    print(write_results(evaluator.rows, save_path, header, scoring))
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
