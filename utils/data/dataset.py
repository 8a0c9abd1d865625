"""One dataset class for every standardized dataset (docs/reproduction.md §1 preprocessing, §7
training data, §9 meta).

A data root holds ``meta_<name>.json`` = ``{"train": {product: [entry, ...]}, "test": {...}}``; each
entry is ``{img_path, mask_path, cls_name, specie_name, dataset_name, anomaly}`` with paths relative
to the root (``mask_path`` is ``""`` for good images). ``dataset/make_meta.py`` writes it.

Preprocessing is the reference's, byte for byte (the metrics depend on Pillow's resampling):

* image: Pillow open -> torchvision ``Resize((S, S), BICUBIC)`` on the PIL image (= Pillow's
  ``Image.resize``) -> ``CenterCrop(S)`` (a no-op after the square resize, kept for parity) ->
  ``convert("RGB")`` -> ``ToTensor`` -> ``Normalize(CLIP_MEAN, CLIP_STD)``;
* mask: Pillow open -> ``convert("L")`` -> ``> 0`` to {0, 255} (the reference binarizes the file
  first, a no-op for the standardized 0/255 PNGs) -> ``Resize((S, S))`` with torchvision's default
  bilinear -> ``CenterCrop(S)`` -> ``ToTensor`` ([0, 1]) -> ``> 0.5`` to {0, 1};
* good images (``anomaly == 0``) get an all-zero mask.

Order "resize, then convert to RGB" (the reference's, kept): it changes nothing for RGB or grey
("L") files — bicubic works per channel and L->RGB only copies the channel — but it does for
images with transparency or a palette: Pillow resizes RGBA/LA with premultiplied alpha (colours
are alpha-weighted, and un-premultiplied afterwards) and resizes palette ("P") and bilevel ("1")
images with nearest neighbour whatever filter is asked. The standardized BMPs are 24-bit RGB, so
none of this arises on the reference datasets. ``tests/test_data.py`` pins these facts.

Training (docs/reproduction.md §7): an ``augment`` callable (``utils.data.augment.Augment``) is
applied to the
original-size uint8 RGB image and its {0,255} mask before the preprocessing above; with
probability ``mosaic_rate`` a sample is replaced by a 2x2 mosaic of four anomalous images of the
same product (see ``AnomalyDataset`` for the exact layout).

Randomness: each sample that needs any builds a ``numpy.random.Generator`` for itself. By default
its seed is one 62-bit draw from torch's default generator: in the main process (``num_workers=0``)
that generator is the global one (``torch.manual_seed``); in a DataLoader worker torch has already
seeded it with the loader's per-epoch base seed + worker id. So a fixed global torch seed gives
identical batches for a given ``num_workers`` (0 or more) with no ``worker_init_fn``, and epochs
differ. After ``seed_samples(seed, epoch)`` (what training does) the generator is seeded with
``(seed, epoch, index)`` instead: a sample's draws no longer depend on which worker loads it or on
what was loaded before, so a run resumed in the middle of an epoch repeats the uninterrupted one,
for any ``num_workers``. Samples that need no randomness (test time) do not touch torch's RNG.

A file that cannot be decoded (truncated, not an image) raises ``DataError`` naming it and its
product, also from a DataLoader worker; ``check_readable`` decodes every file up front.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from utils.errors import DataError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "AnomalyDataset",
    "image_transform",
    "mask_transform",
    "open_image",
    "open_mask",
    "load_meta",
    "meta_path",
    "choose_references",
]

# OpenAI CLIP's normalization constants (docs/reproduction.md §1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPLITS = ("train", "test")
# Keys every meta entry must have (``specie_name`` and ``dataset_name`` are written by make_meta
# but nothing here reads them, so their absence is not an error).
ENTRY_KEYS = ("img_path", "mask_path", "cls_name", "anomaly")
_MAX_LISTED = 10  # missing files named in one error message


# ----------------------------------------------------------------------------------------------
# Preprocessing (docs/reproduction.md §1)
# ----------------------------------------------------------------------------------------------

class _ConvertRGB:
    """``img.convert("RGB")`` as a picklable transform (DataLoader workers may pickle it)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.convert("RGB")

    def __repr__(self) -> str:
        return "ConvertRGB()"


class _Binarize:
    """``(x > threshold)`` as float: the reference's ``gt[gt > 0.5] = 1, else 0``."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(torch.float32)

    def __repr__(self) -> str:
        return f"Binarize(> {self.threshold})"


def image_transform(size: int = 518) -> T.Compose:
    """PIL image (any mode) -> float32 tensor [3, size, size], CLIP-normalized
    (docs/reproduction.md §1)."""
    return T.Compose([
        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _ConvertRGB(),  # after the resize, as in the reference (see the module docstring)
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def mask_transform(size: int = 518) -> T.Compose:
    """PIL "L" mask with values {0, 255} -> float32 tensor [1, size, size] in {0, 1}
    (docs/reproduction.md §1)."""
    return T.Compose([
        T.Resize((size, size)),  # torchvision's default interpolation: bilinear
        T.CenterCrop(size),
        T.ToTensor(),  # [1, S, S] in [0, 1]
        _Binarize(0.5),
    ])


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open an image with Pillow, mode unchanged, pixels loaded and the file closed."""
    with Image.open(path) as im:
        im.load()
        return im


def open_mask(path: str | os.PathLike) -> Image.Image:
    """Open a mask file as a Pillow "L" image with values {0, 255} (any value > 0 becomes 255)."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L")) > 0
    return Image.fromarray(arr.astype(np.uint8) * 255)  # uint8 [H,W] -> "L"


# ----------------------------------------------------------------------------------------------
# Meta file
# ----------------------------------------------------------------------------------------------

def meta_path(root: str | os.PathLike, dataset_name: str) -> Path:
    """``<root>/meta_<dataset_name>.json``."""
    return Path(root) / f"meta_{dataset_name}.json"


def load_meta(root: str | os.PathLike, dataset_name: str) -> dict[str, dict[str, list[dict]]]:
    """Read and structurally validate ``<root>/meta_<dataset_name>.json``; raise ``DataError``.

    Checks: the file exists and is JSON; the top level is an object with "train" and "test", each
    mapping product -> list of entries; each entry is an object with ``ENTRY_KEYS``, string paths,
    ``anomaly`` 0 or 1 and ``cls_name`` equal to its product key. Does not look at the data files.
    """
    path = meta_path(root, dataset_name)
    if not path.is_file():
        where = ("the data root itself does not exist" if not Path(root).is_dir()
                 else "the data root exists but has no such file")
        raise DataError(
            f"meta file not found: {path} ({where}). Create it with: "
            f"python dataset/make_meta.py --data_path {root} --dataset {dataset_name}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: the top level must be an object with keys 'train' and 'test', "
                        f"got {type(meta).__name__}")
    for split in SPLITS:
        if split not in meta:
            raise DataError(f"{path}: missing key '{split}' (found keys: {sorted(meta)}); "
                            "expected {\"train\": {product: [entries]}, \"test\": {...}}")
        if not isinstance(meta[split], dict):
            raise DataError(f"{path}: '{split}' must map product names to lists of entries, "
                            f"got {type(meta[split]).__name__}")
        for product, entries in meta[split].items():
            where = f"{path}: ['{split}']['{product}']"
            if not isinstance(entries, list):
                raise DataError(f"{where} must be a list of entries, got {type(entries).__name__}")
            for i, entry in enumerate(entries):
                _check_entry(entry, f"{where}[{i}]", product)
    return meta


def choose_references(root: str | os.PathLike, dataset_name: str, products: Iterable[str],
                      k: int | None, seed: int) -> dict[str, list[str]]:
    """K normal images per product from its ``train`` split (few-shot references, ours); every
    one of them with ``k`` None.

    A seeded choice without replacement that depends only on ``seed``, the product's name and its
    train entries (so adding a product changes no other's references); returned in meta order as
    paths relative to ``root``. Raises ``DataError`` naming the product that has fewer than K
    (none, with ``k`` None).
    """
    train = load_meta(root, dataset_name)["train"]
    chosen = {}
    for product in products:
        normal = [e["img_path"] for e in train.get(product, []) if e["anomaly"] == 0]
        if len(normal) < (k or 1):
            raise DataError(f"{'all' if k is None else k}: product {product!r} has "
                            f"{len(normal)} normal images in the train split of "
                            f"{meta_path(root, dataset_name)}", option="k_shot")
        if k is None:
            chosen[product] = normal
            continue
        rng = np.random.default_rng([seed, zlib.crc32(product.encode())])
        chosen[product] = [normal[i] for i in sorted(rng.choice(len(normal), k, replace=False))]
    return chosen


def _check_entry(entry: Any, where: str, product: str) -> None:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: an entry must be an object, got {type(entry).__name__}")
    for key in ENTRY_KEYS:
        if key not in entry:
            raise DataError(f"{where}: missing key '{key}' (an entry needs {list(ENTRY_KEYS)})")
    for key in ("img_path", "mask_path", "cls_name"):
        if not isinstance(entry[key], str):
            raise DataError(f"{where}: '{key}' must be a string, got {entry[key]!r}")
    if not entry["img_path"]:
        raise DataError(f"{where}: 'img_path' is empty")
    if entry["anomaly"] not in (0, 1) or isinstance(entry["anomaly"], float):
        raise DataError(f"{where}: 'anomaly' must be 0 or 1, got {entry['anomaly']!r}")
    if entry["cls_name"] != product:
        # Products must be contiguous and named consistently: the test script groups by product.
        raise DataError(f"{where}: 'cls_name' is {entry['cls_name']!r} but the entry is listed "
                        f"under product {product!r}")


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------

class AnomalyDataset(Dataset):
    """Samples of one split of a standardized dataset, product by product in meta-file order.

    Args:
        root: data root holding ``meta_<dataset_name>.json``; entry paths are relative to it.
        dataset_name: the ``<name>`` of the meta file (``mvtec``, ``visa``, or any other).
        split: ``"test"`` (the split with masks; also the reference's training data) or ``"train"``.
        products: product names to keep (in meta-file order), a single name, or None for all
            products that have entries.
        image_size: S, the side of the square output.
        augment: optional callable ``augment(image, mask, rng) -> (image, mask)`` on uint8 RGB
            [H,W,3] and uint8 {0,255} [H,W] arrays (``utils.data.augment.Augment``), applied
            before the preprocessing. Training only.
        mosaic_rate: probability that a sample is replaced by a 2x2 mosaic of four anomalous
            images of its product (docs/reproduction.md §7; the reference uses 0.2 for MVTec-AD
            training only).

    Mosaic layout (as the reference builds it): four anomalous entries of the sample's product
    are drawn uniformly *with replacement*; each image is converted to RGB; with (W, H) the size
    of the first one, a black 2W x 2H canvas gets tile i (i = 0..3) pasted at full size at
    (x, y) = ((i % 2) * W, (i // 2) * H), i.e. row-major: top-left, top-right, bottom-left,
    bottom-right. The masks are tiled identically. A tile whose size differs from (W, H) is first
    resized to (W, H) (bicubic image, nearest mask) *(ours; the reference would crop or leave black
    gaps; all images of one product have the same size in MVTec-AD and VisA)*. The mosaic then
    goes through ``augment`` and the usual preprocessing, so the whole 2W x 2H canvas is resized to
    S x S. A mosaic sample reports ``anomaly`` 1 and ``mosaic`` True; its ``path`` and ``index``
    stay those of the indexed entry. A product with no anomalous entries never gets a mosaic.

    ``__getitem__`` returns ``{"image": float32 [3,S,S], "mask": float32 [1,S,S] in {0,1},
    "product": str, "anomaly": int, "path": str (relative to root), "index": int,
    "mosaic": bool}``; the default collate batches it.

    Construction validates everything that can fail before any model work and raises
    ``DataError`` naming the file, key or product: missing or malformed meta file, unknown or
    empty products, and missing image / mask files (all of them counted, the first few listed).
    """

    def __init__(self, root: str | os.PathLike, dataset_name: str, split: str = "test",
                 products: Iterable[str] | str | None = None, image_size: int = 518,
                 augment: Callable | None = None, mosaic_rate: float = 0.0):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size <= 0:
            raise DataError(f"image_size must be a positive int, got {image_size!r}")
        if not 0.0 <= float(mosaic_rate) <= 1.0:
            raise DataError(f"mosaic_rate must be in [0, 1], got {mosaic_rate!r}")
        if augment is not None and not callable(augment):
            raise DataError(f"augment must be callable or None, got {type(augment).__name__}")

        self.root = Path(root)
        self.dataset_name = dataset_name
        self.split = split
        self.image_size = image_size
        self.augment = augment
        self.mosaic_rate = float(mosaic_rate)
        self.meta_file = meta_path(root, dataset_name)

        table = load_meta(root, dataset_name)[split]
        self.products = self._select_products(table, products)

        # Flatten product by product; entries keep their meta-file order.
        self.entries: list[dict[str, Any]] = []
        self.product_ranges: dict[str, range] = {}
        for product in self.products:
            start = len(self.entries)
            for e in table[product]:
                self.entries.append({"img_path": e["img_path"], "mask_path": e["mask_path"],
                                     "product": e["cls_name"], "anomaly": int(e["anomaly"])})
            self.product_ranges[product] = range(start, len(self.entries))
        # Indices of the anomalous entries of each product: the mosaic's pool.
        self._anomalous: dict[str, list[int]] = {
            p: [i for i in r if self.entries[i]["anomaly"] == 1]
            for p, r in self.product_ranges.items()}
        self._check_files()
        self.sample_key: tuple[int, int] | None = None  # (seed, epoch), see seed_samples

        self.image_tf = image_transform(image_size)
        self.mask_tf = mask_transform(image_size)

    # -- construction helpers -------------------------------------------------------------------

    def _select_products(self, table: dict[str, list], products) -> list[str]:
        if products is None:
            chosen = [p for p, entries in table.items() if entries]
            if not chosen:
                raise DataError(f"{self.meta_file}: split '{self.split}' has no entries")
            return chosen
        if isinstance(products, str):
            products = [products]
        wanted = list(dict.fromkeys(products))  # de-duplicate, keep order
        if not wanted:
            raise DataError("products is an empty list; pass None for all products")
        unknown = [p for p in wanted if p not in table]
        if unknown:
            raise DataError(f"product(s) {unknown} not in split '{self.split}' of "
                            f"{self.meta_file}; available: {list(table)}")
        empty = [p for p in wanted if not table[p]]
        if empty:
            raise DataError(f"product(s) {empty} have no entries in split '{self.split}' of "
                            f"{self.meta_file}")
        return [p for p in table if p in wanted]  # meta-file order

    def _check_files(self) -> None:
        missing = []
        for e in self.entries:
            if not (self.root / e["img_path"]).is_file():
                missing.append(e["img_path"])
            if e["anomaly"] == 1 and e["mask_path"] and not (self.root / e["mask_path"]).is_file():
                missing.append(e["mask_path"])
        if missing:
            shown = "\n  ".join(missing[:_MAX_LISTED])
            extra = len(missing) - _MAX_LISTED
            more = f"\n  ... and {extra} more" if extra > 0 else ""
            raise DataError(f"{len(missing)} file(s) listed in {self.meta_file} are missing under "
                            f"{self.root}:\n  {shown}{more}")

    # -- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def check_readable(self, threads: int = 8) -> None:
        """Decode every image and mask now; one ``DataError`` lists those that cannot be read (a
        run that met one later would stop halfway, or score without it)."""
        def problem(entry: dict[str, Any]) -> str | None:
            try:
                self._load(entry)
            except DataError as e:
                return str(e)
            return None

        with ThreadPoolExecutor(threads) as pool:  # Pillow decodes without the GIL
            problems = [p for p in pool.map(problem, self.entries) if p]
        if problems:
            more = (f"\n  ... and {len(problems) - _MAX_LISTED} more"
                    if len(problems) > _MAX_LISTED else "")
            raise DataError(f"{len(problems)} file(s) listed in {self.meta_file} cannot be read:"
                            "\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)

    def _load(self, entry: dict[str, Any]) -> tuple[Image.Image, Image.Image | None]:
        """The entry's PIL image (mode as stored) and {0,255} "L" mask, or None for no defect."""
        image = self._read(open_image, entry, "img_path")
        mask = None
        if entry["anomaly"] == 1 and entry["mask_path"]:
            mask = self._read(open_mask, entry, "mask_path")
        return image, mask

    def _read(self, opener: Callable, entry: dict[str, Any], key: str) -> Image.Image:
        path = self.root / entry[key]
        try:
            return opener(path)
        except Exception as e:  # truncated, not an image, unreadable: Pillow raises many types
            kind = "image" if key == "img_path" else "mask"
            raise DataError(f"cannot read {kind} {path} (product {entry['product']!r}): "
                            f"{type(e).__name__}: {e}") from None

    def _mosaic(self, product: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
        pool = self._anomalous[product]
        picks = rng.integers(0, len(pool), size=4)
        tiles = [self._load(self.entries[pool[int(j)]]) for j in picks]
        w, h = tiles[0][0].size
        canvas = Image.new("RGB", (2 * w, 2 * h))
        canvas_mask = Image.new("L", (2 * w, 2 * h))
        for i, (img, mask) in enumerate(tiles):
            img = img.convert("RGB")
            if mask is None:  # anomalous entry without a mask file: no labelled pixels
                mask = Image.new("L", img.size)
            if img.size != (w, h):
                img = img.resize((w, h), Image.BICUBIC)
            if mask.size != (w, h):
                mask = mask.resize((w, h), Image.NEAREST)
            xy = ((i % 2) * w, (i // 2) * h)
            canvas.paste(img, xy)
            canvas_mask.paste(mask, xy)
        return canvas, canvas_mask

    def seed_samples(self, seed: int, epoch: int) -> None:
        """From now on the randomness of sample ``index`` is a function of (seed, epoch, index)
        alone (see the module docstring). Call it before each epoch's loader iterator is made:
        the worker processes take a copy of the dataset then."""
        self.sample_key = (seed, epoch)

    def _sample_rng(self, index: int) -> np.random.Generator:
        if self.sample_key is not None:
            return np.random.default_rng([*self.sample_key, index])
        # One draw from torch's default generator: the global one in the main process, the
        # per-worker one (seeded by the DataLoader) in a worker. See the module docstring.
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        return np.random.default_rng(seed)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry = self.entries[index]
        product = entry["product"]
        anomaly = entry["anomaly"]
        random = self.augment is not None or self.mosaic_rate > 0
        rng = self._sample_rng(index) if random else None

        mosaic = (rng is not None and self.mosaic_rate > 0 and bool(self._anomalous[product])
                  and rng.random() < self.mosaic_rate)
        if mosaic:
            image, mask = self._mosaic(product, rng)
            anomaly = 1
        else:
            image, mask = self._load(entry)

        if self.augment is not None:
            img_np = np.array(image.convert("RGB"))  # [H,W,3] uint8, writable copy
            if mask is None:
                mask_np = np.zeros(img_np.shape[:2], dtype=np.uint8)
            else:
                mask_np = np.array(mask)  # [H,W] uint8 {0,255}
                if mask_np.shape != img_np.shape[:2]:
                    raise DataError(
                        f"mask {entry['mask_path']} has size {mask_np.shape[::-1]} but image "
                        f"{entry['img_path']} has size {img_np.shape[1::-1]} (W x H); "
                        "augmentation needs them equal")
            img_np, mask_np = self.augment(img_np, mask_np, rng)
            image = Image.fromarray(np.ascontiguousarray(img_np))  # -> "RGB"
            mask = Image.fromarray(np.ascontiguousarray(mask_np))  # -> "L"

        image_t = self.image_tf(image)  # [3,S,S]
        if mask is None:
            mask_t = torch.zeros(1, self.image_size, self.image_size)  # good image: no defect
        else:
            mask_t = self.mask_tf(mask)  # [1,S,S] in {0,1}
        return {"image": image_t, "mask": mask_t, "product": product, "anomaly": int(anomaly),
                "path": entry["img_path"], "index": int(index), "mosaic": bool(mosaic)}
