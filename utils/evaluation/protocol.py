"""The paper's test protocol as a library: a model's maps over a standardized dataset ->
per-product pixel and image metrics, the table, metrics.json and the heat-map panels
(docs/reproduction.md §10, docs/testing.md).

    from utils.evaluation.protocol import evaluate
    rows = evaluate(TorchRuntime.load(source, device), AnomalyDataset(root, "mvtec", "test"),
                    save_path)

Products are evaluated as the loader reaches them (they are contiguous in a meta file): a
product's metrics run in a background thread while the model runs on the next product, so the
metrics keep up with the forward pass and memory holds the products in flight, never the dataset.
A scoring strategy (``utils/scoring``) may score each product beyond zero-shot; its patch-score
map is fused with each zero-shot branch before the protocol's smoothing, normalization and
metrics, and its image scores (where it gives them) replace the top-k score. With the zero-shot
strategy the numbers are the paper's, bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from utils.data.dataset import AnomalyDataset
from utils.errors import DataError
from utils.files import atomic_write
from utils.evaluation.metrics import evaluate_product, format_table, mean_row
from utils.inference.runtime import Runtime, RuntimeOutput
from utils.scoring import GroupScorer, Strategy, ZeroShot
from utils.evaluation.visualize import save_panel

__all__ = ["PROGRESS", "first_to_read", "metric_threads", "Evaluator", "write_results",
           "evaluate"]

PROGRESS = "progress.json"  # the finished products' rows while a run is on


def first_to_read(dataset: AnomalyDataset, done: dict, batch_size: int) -> int:
    """The first image the loader reads when the products in ``done`` are finished: the start of
    the batch, as an uninterrupted run batches them, that holds the first unfinished product's
    first image (so every image meets the same batch and gets the same numbers)."""
    todo = [r.start for p, r in dataset.product_ranges.items() if p not in done]
    return todo[0] // batch_size * batch_size if todo else len(dataset)



@dataclass
class Product:
    """The maps of one product, gathered batch by batch."""

    name: str
    raw: list = field(default_factory=list)  # [S,S] float32 each
    new: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # [S,S] bool
    labels: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    scorer: GroupScorer | None = None  # its scoring strategy's, fed batch by batch
    patch: np.ndarray | None = None  # [N,S,S] float32 patch-score maps, once it is complete


def metric_threads() -> int:
    """Products whose metrics run at once: half the cores, 1 to 8 (NumPy's sorts and SciPy's
    filters release the GIL, so the products' metrics overlap: docs/performance.md); each thread
    holds one product's maps."""
    return max(1, min(8, (os.cpu_count() or 1) // 2))



class Evaluator:
    """Finishes each product when the next one starts (scored by ``strategy``): its metrics in a
    background thread while
    the model runs on the next products, then its panels in writer threads. Rows are collected
    in product order; memory holds the products in flight, never the dataset."""

    def __init__(self, data_root: Path, save_path: Path, visualize: bool,
                 strategy: Strategy | None = None, threads: int | None = None,
                 run: dict | None = None, done: dict[str, dict] | None = None):
        self.data_root, self.save_path, self.visualize = data_root, save_path, visualize
        self.strategy = strategy or ZeroShot()  # how each product is scored beyond zero-shot
        self.run = run  # what the results depend on, for the progress file (None: no file)
        self.rows: dict[str, dict] = dict(done or {})  # finished products, in meta-file order
        self.done = set(self.rows)  # finished by an earlier run (resumed): their images skipped
        self.images = 0
        # seconds per stage; "metrics" and "panels" are the background threads' own time,
        # "metrics_wait" / "panels_wait" the wall time the main thread waited for them
        self.seconds = {"forward": 0.0, "metrics": 0.0, "metrics_wait": 0.0, "panels": 0.0,
                        "panels_wait": 0.0}
        if self.strategy.patch_map:
            self.seconds["patch_scoring"] = 0.0
        self.current: Product | None = None
        self.seen: set[str] = set()
        self.threads = threads or metric_threads()
        self.metrics = ThreadPoolExecutor(max_workers=self.threads)
        self.jobs: deque = deque()  # (product, future of (row, seconds, panel futures)), in order
        self.writer = ThreadPoolExecutor(max_workers=4) if visualize else None
        self.panels = []  # the last collected product's panel futures

    def add(self, product: str, output: RuntimeOutput, rows: list[int], masks: np.ndarray,
            labels: list[int], paths: list[str]) -> None:
        """The rows ``rows`` of a batch's runtime ``output``, all of ``product``, with their
        masks [b,S,S] bool, labels and paths (relative to the data root)."""
        if product in self.done:
            return
        if self.current is None or self.current.name != product:
            self.finish()
            if product in self.seen:
                raise DataError(f"product {product!r} is not contiguous in the meta file")
            self.seen.add(product)
            self.current = Product(product, scorer=self._timed(self.strategy.group, product))
        c = self.current
        self.images += len(rows)
        for k, i in enumerate(rows):
            c.raw.append(output.raw[i]), c.new.append(output.new[i]), c.masks.append(masks[k])
            c.labels.append(labels[k]), c.paths.append(paths[k])
        self._timed(c.scorer.add, output, rows)

    def _timed(self, work, *args):
        if not self.strategy.patch_map:
            return work(*args)
        start = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.seconds["patch_scoring"] += time.perf_counter() - start

    def finish(self) -> None:
        """Hands the current product to a metrics thread, once one is free; its patch maps are
        made first, here (on the model's device), so one product's tokens are held at a time."""
        c, self.current = self.current, None
        if c is None:
            return
        c.patch = self._timed(c.scorer.patch_maps)
        while len(self.jobs) >= self.threads:
            self._collect()
        self.jobs.append((c.name, self.metrics.submit(self._evaluate, c)))

    def _evaluate(self, c: Product) -> tuple[dict, float, list]:
        """Metrics of one product, then its panels handed to the writers (metrics thread)."""
        start = time.perf_counter()
        raw, new, scores = self.strategy.finish(np.stack(c.raw), np.stack(c.new), c.patch,
                                                c.scorer)
        masks = np.stack(c.masks)
        row, pixel_maps = evaluate_product(raw, new, masks, np.asarray(c.labels), c.name,
                                           scores=scores)
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


def _product_rows(products: list[str]) -> list[tuple[str, list[int]]]:
    """A batch's rows grouped by product, in order (products are contiguous)."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(products):
        groups.setdefault(p, []).append(i)
    return list(groups.items())


def evaluate(runtime: Runtime, dataset: AnomalyDataset, save_path: str | Path,
             strategy: Strategy | None = None, batch_size: int = 8, num_workers: int = 0,
             visualize: bool = True, run: dict | None = None,
             done: dict[str, dict] | None = None, pin_memory: bool = False) -> Evaluator:
    """Every test image of ``dataset`` through ``runtime``, scored by ``strategy`` (zero-shot
    by default); returns the finished evaluator (``rows``: product -> metrics, ``seconds``).

    ``run``: what the results depend on, kept in ``save_path``/progress.json with the finished
    products' rows while the run is on (None: no progress file); ``done``: rows of products that
    an interrupted run with the same ``run`` finished, whose images are not read again."""
    save_path = Path(save_path)
    first = first_to_read(dataset, done or {}, batch_size)
    loader = DataLoader(Subset(dataset, range(first, len(dataset))), batch_size=batch_size,
                        shuffle=False, num_workers=num_workers, pin_memory=pin_memory)
    evaluator = Evaluator(Path(dataset.root), save_path, visualize, strategy, run=run, done=done)
    try:
        for batch in tqdm(loader, desc=f"test {dataset.dataset_name}", unit="batch"):
            tick = time.perf_counter()
            output = runtime(batch["image"])  # raw, new [B, S, S]
            evaluator.seconds["forward"] += time.perf_counter() - tick
            masks = batch["mask"][:, 0].numpy() > 0.5  # [B, S, S]
            for product, rows in _product_rows(batch["product"]):
                evaluator.add(product, output, rows, masks[rows],
                              [int(batch["anomaly"][i]) for i in rows],
                              [batch["path"][i] for i in rows])
    except BaseException:  # an unreadable image, Ctrl-C: keep the products already handed over
        with contextlib.suppress(Exception):  # a second failure must not hide the first
            evaluator.close(failed=True)
        raise
    evaluator.close()
    return evaluator
