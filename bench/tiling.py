"""Tiled inference on high-resolution images with small defects (docs/predict.md,
"High-resolution images"): untiled against ``--tile``, on a generated set, with a trained model.

    python bench/tiling.py               # the demo's checkpoint (`make demo` first); minutes
    python bench/tiling.py --huge 13000      # the peak memory of one 13000 x 13000 image
    python bench/tiling.py --throughput 4000x3000 --device cuda --batch_size 32 --num_workers 4
                               # tiles/s of ViT-L/14@336 at 518 px (random weights) on a GPU
    python bench/tiling.py --config configs/tiny.json --image_size 56 --scale 0.1 \\
        --products grass --anomalous 1 --normal 0 --references 1   # a smoke run (random weights)

The set (``make_set``; our own generator): per product an image size (one strongly non-square),
``--anomalous`` images with three small defects each (stains, scratches and holes 8-20 px across,
with exact masks), ``--normal`` normal test images and ``--references`` normal references; every
image a mirrored mosaic of the product's scikit-image photograph (``dataset/synthetic.py``'s
sources, at half size) with its own offset, flips and brightness. The products are ones the demo
never trains on.

Five runs, each in a fresh process (so its peak memory is its own): untiled and tiled, zero-shot
and with the references (``--reference``'s scoring); and the tiled zero-shot run's tiles cut by
hand into PNG files and run as files, untiled (these two ``--repeat`` times, alternately: the
least time of each counts, so that a machine shared with other work treats them alike).
Printed: per product and their mean, pixel AUROC and AUPRO at the images' full resolution (an
untiled map resized bilinearly to the image, as ``predict.py`` sizes its mask); per run its tiles,
time per megapixel and peak RSS (and its growth over the loaded model). The last line is the
hand-cut files' time over the tiled run's: ``speedup: N.Nx`` (tiling must cost no more than
cutting by hand).

``--throughput WxH`` instead measures tiled inference's speed: ``--images`` generated images of
W x H through ``predict.py``'s service with tiles of each of ``--sides`` px, a random model of
``--config`` (default ViT-L/14@336 at 518 px) on ``--device``: tiles/s and megapixels/s, the
reading of the images and the stitching included (``bench/gpu_suite.py``'s step ``tiling``).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build, evenly_spaced_layers, peak_memory  # noqa: E402
from dataset.synthetic import load_source, soft_weight  # noqa: E402
from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip, save_checkpoint  # noqa: E402
from tests.helpers.random_clip import write_openai_archive  # noqa: E402
from utils.evaluation.metrics import aupro_official, binary_curve, roc_auc  # noqa: E402
from utils.inference.outputs import OutputWriter, full_size  # noqa: E402
from utils.inference.prediction import Prediction, Predictor  # noqa: E402
from utils.inference.runtime import ModelSource, TorchRuntime, read_model  # noqa: E402
from utils.device import select_device  # noqa: E402
from utils.inference.tiling import DEFAULT_OVERLAP, Tiling, grid  # noqa: E402
from utils.scoring import Context, make_strategy  # noqa: E402

# (width, height) per product at --scale 1: a square, a 4:3 and a 16:3 line-scan strip
SIZES = {"grass": (1024, 1024), "moon": (1024, 768), "cell": (1536, 288)}
DEFECTS_PER_IMAGE = 3
BATCH = 8  # predict.py's default


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint_path",
                   default=str(ROOT / "demo_output/checkpoints/epoch_12_group_id_2.pth"))
    p.add_argument("--pretrained_path", default=str(ROOT / "demo_output/clip_demo.pt"))
    p.add_argument("--config", default=None,
                   help="instead of the checkpoint: random weights of this backbone config")
    p.add_argument("--image_size", type=int, default=None,
                   help="with --config (default 128; 518 with --throughput)")
    p.add_argument("--products", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--scale", type=float, default=1.0, help="of the products' image sizes")
    p.add_argument("--anomalous", type=int, default=3, help="test images with defects, per product")
    p.add_argument("--normal", type=int, default=1, help="normal test images per product")
    p.add_argument("--references", type=int, default=2, help="normal references per product")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in px (default: the model's input size)")
    p.add_argument("--tile_overlap", type=float, default=DEFAULT_OVERLAP)
    p.add_argument("--huge", type=int, default=None, metavar="SIDE",
                   help="instead: one SIDE x SIDE image through predict.py's service and "
                        "writer, untiled and with --tile (default 512 here): peak memory")
    p.add_argument("--repeat", type=int, default=2,
                   help="times the tiled and hand-cut runs are timed, alternately (the least "
                        "time counts; default %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="PyTorch's CPU threads (default: its own default, %(default)s here)")
    p.add_argument("--throughput", default=None, metavar="WxH",
                   help="instead: tiles/s of --images images of W x H at each of --sides")
    p.add_argument("--sides", type=int, nargs="+", default=[518, 1036])
    p.add_argument("--images", type=int, default=8, help="with --throughput")
    p.add_argument("--device", default="cpu", help="with --throughput (cpu, cuda, ...)")
    p.add_argument("--batch_size", type=int, default=BATCH, help="with --throughput")
    p.add_argument("--num_workers", type=int, default=0, help="with --throughput")
    p.add_argument("--work_dir", default=None, help="default: a temporary folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.throughput:
        args.config = args.config or str(ROOT / "configs/ViT-L-14-336.json")
    args.image_size = args.image_size or (518 if args.throughput else 128)
    return args


# -- the set ------------------------------------------------------------------------------------

def mosaic(product: str, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """uint8 RGB [H, W, 3]: the product's photo at half size, mirrored to cover ``size``
    (width, height) from a random offset, flipped at random, its brightness changed <= 4 %."""
    photo = load_source(product)
    base = cv2.resize(photo, (photo.shape[1] // 2, photo.shape[0] // 2),
                      interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        base = base[:, ::-1]
    if rng.random() < 0.5:
        base = base[::-1]
    oy, ox = (int(rng.integers(0, n)) for n in base.shape[:2])
    w, h = size
    tiled = np.pad(base, ((oy, max(0, h - base.shape[0])), (ox, max(0, w - base.shape[1])),
                          (0, 0)), mode="symmetric")[oy:oy + h, ox:ox + w]
    return np.clip(tiled * rng.uniform(0.96, 1.04), 0, 255).astype(np.uint8)


def small_defect(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> None:
    """One stain, scratch or hole 8-20 px across, drawn into ``image`` [H, W, 3] uint8 and its
    region into ``mask`` [H, W] uint8 (255), away from the border and from other defects."""
    h, w = mask.shape
    d = int(rng.integers(8, 21))
    for _ in range(100):
        cy, cx = int(rng.integers(24, h - 24)), int(rng.integers(24, w - 24))
        if not mask[cy - 24:cy + 24, cx - 24:cx + 24].any():
            break
    window = np.zeros((48, 48), np.uint8)  # the defect's surroundings, centred at (24, 24)
    kind = rng.choice(["stain", "scratch", "hole"])
    angle = rng.uniform(0, np.pi)
    if kind == "stain":
        cv2.ellipse(window, (24, 24), (d // 2, max(2, int(d / 2 * rng.uniform(0.5, 1)))),
                    float(np.degrees(angle)), 0, 360, 1, -1)
        colour = np.array([rng.uniform(150, 255), rng.uniform(0, 80), rng.uniform(0, 120)])
    elif kind == "scratch":
        dy, dx = d / 2 * np.sin(angle), d / 2 * np.cos(angle)
        cv2.line(window, (int(24 - dx), int(24 - dy)), (int(24 + dx), int(24 + dy)), 1,
                 int(rng.integers(2, 4)))
        colour = np.full(3, rng.choice([rng.uniform(0, 30), rng.uniform(225, 255)]))
    else:
        corners = rng.uniform(0, 2 * np.pi, int(rng.integers(5, 8)))
        radii = rng.uniform(d / 4, d / 2, corners.size)
        points = np.stack([24 + radii * np.cos(np.sort(corners)),
                           24 + radii * np.sin(np.sort(corners))], 1)
        cv2.fillPoly(window, [np.round(points).astype(np.int32)], 1)
        colour = rng.uniform(0, 35, 3)
    region = window.astype(bool)
    weight = soft_weight(region, edge=1)[..., None] * rng.uniform(0.85, 1.0)
    patch = image[cy - 24:cy + 24, cx - 24:cx + 24].astype(np.float32)
    image[cy - 24:cy + 24, cx - 24:cx + 24] = np.clip(
        patch * (1 - weight) + colour * weight, 0, 255).astype(np.uint8)
    mask[cy - 24:cy + 24, cx - 24:cx + 24][region] = 255


def make_set(root: Path, args) -> dict[str, dict[str, list[Path]]]:
    """product -> {"test": images, "masks": their masks (None: normal), "references": ...}."""
    made = {}
    for product in args.products:
        rng = np.random.default_rng([args.seed, list(SIZES).index(product)])
        size = tuple(max(96, round(n * args.scale)) for n in SIZES[product])
        folder = root / product
        for sub in ("test", "masks", "references"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        files = {"test": [], "masks": [], "references": []}
        for k in range(args.references):
            files["references"].append(folder / "references" / f"ref_{k}.png")
            Image.fromarray(mosaic(product, size, rng)).save(files["references"][-1])
        for k in range(args.normal + args.anomalous):
            image = mosaic(product, size, rng)
            mask = np.zeros(image.shape[:2], np.uint8)
            name = f"good_{k}" if k < args.normal else f"bad_{k}"
            for _ in range(0 if k < args.normal else DEFECTS_PER_IMAGE):
                small_defect(image, mask, rng)
            files["test"].append(folder / "test" / f"{name}.png")
            files["masks"].append(folder / "masks" / f"{name}.png")
            Image.fromarray(image).save(files["test"][-1])
            Image.fromarray(mask).save(files["masks"][-1])
        made[product] = files
    return made


def random_model(work: Path, config: str, image_size: int) -> tuple[str, str]:
    """A random VCP checkpoint and CLIP archive of ``config`` (the smoke run's model)."""
    cfg = CLIPConfig.from_json(config)
    archive = write_openai_archive(cfg, work / "clip.pt")
    vcp = VCPConfig(features_list=evenly_spaced_layers(cfg.vision_layers), image_size=image_size,
                    total_d_layer_len=cfg.text_layers - 1)
    torch.manual_seed(0)
    save_checkpoint(VCPCLIP(load_clip(archive, image_size), vcp), work / "vcp.pth")
    return str(work / "vcp.pth"), str(archive)


# -- one run, in its own process --------------------------------------------------------------

def memory(field: str) -> int:
    """This process's ``VmHWM`` (peak resident memory) or ``VmRSS`` (now), bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def loaded() -> int:
    """The resident memory with the model loaded; the peak is reset to it (Linux's
    ``clear_refs``), so that loading's own transient peak does not hide the run's."""
    Path("/proc/self/clear_refs").write_text("5")
    return memory("VmRSS")


def run(job: dict) -> dict:
    """Predict ``job["paths"]`` (``tile``: None untiled; ``references``: product -> paths) and
    save each map in ``job["maps"]``; the time, tiles, megapixels and peak memory."""
    torch.set_num_threads(job["threads"])
    runtime = TorchRuntime.load(ModelSource(*job["model"]), torch.device("cpu"))
    base = loaded()
    tiling = Tiling(job["tile"], job["overlap"]) if job["tile"] else None
    strategy = None
    if job["references"]:
        refs = job["references"]
        context = Context(runtime, runtime.image_size, lambda name: refs[Path(name).parent.name],
                          BATCH)
        strategy = make_strategy("reference", {}, context)
    began = time.perf_counter()
    predictor = Predictor(runtime, strategy, BATCH, 0, tiling)
    tiles, pixels, saving = 0, 0, 0.0
    for result in predictor(job["paths"]):
        assert isinstance(result, Prediction), result
        started = time.perf_counter()
        if job["maps"]:
            np.save(Path(job["maps"]) / f"{result.path.parent.parent.name}_{result.path.stem}",
                    result.amap)
        saving += time.perf_counter() - started
        tiles, pixels = tiles + result.tiles, pixels + int(np.prod(result.size))
    seconds = time.perf_counter() - began - saving
    return {"seconds": seconds, "tiles": tiles, "megapixels": pixels / 1e6,
            "peak": memory("VmHWM"), "loaded": base}


def huge_run(job: dict) -> dict:
    """One big image through the service and predict.py's writer (overlay, mask)."""
    torch.set_num_threads(job["threads"])
    runtime = TorchRuntime.load(ModelSource(*job["model"]), torch.device("cpu"))
    base = loaded()
    began = time.perf_counter()
    tiling = Tiling(job["tile"], job["overlap"]) if job["tile"] else None
    writer = OutputWriter(job["out"], threshold=0.5, max_side=4096)
    (result,) = Predictor(runtime, None, BATCH, 0, tiling)(job["paths"])
    writer.write("huge", result)
    return {"seconds": time.perf_counter() - began, "tiles": result.tiles,
            "map": result.amap.shape, "peak": memory("VmHWM"), "loaded": base}


def in_child(fn, job: dict) -> dict:
    """``fn(job)`` in a fresh process (spawned: nothing inherited, its own peak memory)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, job).result()


# -- metrics and report ---------------------------------------------------------------------------

def full_resolution_scores(files: dict, maps: Path, run_name: str) -> tuple[float, float]:
    """Pixel AUROC and AUPRO over a product's test images at their full resolution."""
    stack, truth = [], []
    for image, mask in zip(files["test"], files["masks"]):
        size = Image.open(image).size
        amap = np.load(maps / run_name / f"{image.parent.parent.name}_{image.stem}.npy")
        stack.append(full_size(amap, size))
        truth.append(np.asarray(Image.open(mask)) > 0)
    stack, truth = np.stack(stack), np.stack(truth)
    curve = binary_curve(stack, truth)
    return roc_auc(curve), aupro_official(stack, truth, curve=curve)


def cut_by_hand(files: dict, out: Path, tiling: Tiling) -> list[Path]:
    """Every test image's tiles (the grid a tiled run cuts) written as PNG files."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for product, product_files in files.items():
        for image_path in product_files["test"]:
            image = Image.open(image_path)
            for k, box in enumerate(grid(image.size, tiling)):
                paths.append(out / f"{product}_{image_path.stem}_{k:04d}.png")
                image.crop(box).save(paths[-1])
    return paths


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main_set(args, work: Path, model: tuple[str, str], size: int, threads: int) -> None:
    side = args.tile or size
    files = make_set(work / "set", args)
    tiling = Tiling(side, args.tile_overlap)
    tests = [p for f in files.values() for p in f["test"]]
    refs = {product: f["references"] for product, f in files.items()}
    common = {"model": model, "overlap": args.tile_overlap, "threads": threads}
    began = time.perf_counter()
    cut = cut_by_hand(files, work / "by_hand", tiling)
    cutting = time.perf_counter() - began
    runs = {}  # the tiled run and the hand-cut files alternately: alike conditions
    timed = [("tiled", tests, side, None), ("by_hand", cut, None, None)] * args.repeat
    for name, paths, tile, references in (
            ("untiled", tests, None, None), *timed, ("untiled_refs", tests, None, refs),
            ("tiled_refs", tests, side, refs)):
        maps = None if name == "by_hand" or name in runs else work / "maps" / name
        if maps:
            maps.mkdir(parents=True)
        r = in_child(run, {**common, "paths": paths, "tile": tile, "references": references,
                           "maps": maps and str(maps)})
        runs[name] = min(r, runs.get(name, r), key=lambda r: r["seconds"])
    sizes = ", ".join("{} {}x{}".format(p, *Image.open(f["test"][0]).size)
                      for p, f in files.items())
    print(f"{len(tests)} test images ({sizes}), {args.references} references per product; "
          f"tiles of {side} px, overlap {args.tile_overlap}; the model's input {size} px; "
          f"{threads} threads")
    print(f"{'product':<10} {'':<14} {'untiled':>9} {'tiled':>9}")
    rows = {}
    for product, product_files in files.items():
        for label, a, b in (("zero-shot", "untiled", "tiled"),
                            ("references", "untiled_refs", "tiled_refs")):
            scores = [full_resolution_scores(product_files, work / "maps", r) for r in (a, b)]
            rows.setdefault(label, []).append(scores)
            for metric, k in (("AUROC", 0), ("AUPRO", 1)):
                print(f"{product:<10} {label + ' ' + metric:<22} {100 * scores[0][k]:>6.1f} "
                      f"{100 * scores[1][k]:>9.1f}")
    for label, scores in rows.items():
        mean = np.mean(scores, axis=0)  # [run, metric]
        for metric, k in (("AUROC", 0), ("AUPRO", 1)):
            print(f"{'mean':<10} {label + ' ' + metric:<22} {100 * mean[0][k]:>6.1f} "
                  f"{100 * mean[1][k]:>9.1f}")
    for name, r in runs.items():  # by hand: the megapixels of its tiles (overlaps twice)
        print(f"{name:<13} {r['tiles']:>6} tiles, {r['seconds']:7.1f} s, "
              f"{r['seconds'] / r['megapixels']:6.2f} s per megapixel, peak RSS {gib(r['peak'])} "
              f"({gib(r['peak'] - r['loaded'])} over the loaded model)")
    tiled, by_hand = runs["tiled"]["seconds"], runs["by_hand"]["seconds"]
    print(f"tiled run {tiled:.1f} s; the same {runs['by_hand']['tiles']} tiles cut by hand "
          f"({cutting:.1f} s to cut and write) and run as files {by_hand:.1f} s")
    print(f"speedup: {by_hand / tiled:.1f}x")


def main_huge(args, work: Path, model: tuple[str, str], threads: int) -> None:
    side = args.tile or 512
    rng = np.random.default_rng(args.seed)
    image = work / "huge.bmp"  # uncompressed: written in seconds
    Image.fromarray(mosaic("grass", (args.huge, args.huge), rng)).save(image)
    del rng
    common = {"model": model, "overlap": args.tile_overlap, "threads": threads,
              "paths": [image]}
    for tile in (None, side):
        out = work / f"out_{tile}"
        r = in_child(huge_run, {**common, "tile": tile, "out": str(out)})
        how = "untiled" if tile is None else f"tiles of {tile} px"
        print(f"{args.huge}x{args.huge} image, {how}: {r['tiles']} tiles, map "
              f"{r['map'][1]}x{r['map'][0]}, {r['seconds']:.1f} s, "
              f"peak RSS {gib(r['peak'])} ({gib(r['peak'] - r['loaded'])} over the loaded "
              f"model; the decoded image alone is {gib(3 * args.huge ** 2)})")


def main_throughput(args, work: Path) -> None:
    device = select_device(args.device)
    w, h = (int(n) for n in args.throughput.split("x"))
    rng = np.random.default_rng(args.seed)
    paths = [work / f"image_{k}.png" for k in range(args.images)]
    for path in paths:
        Image.fromarray(mosaic("grass", (w, h), rng)).save(path, compress_level=1)
    args.features_list = None  # bench.common.build: evenly spaced tapped layers
    runtime = TorchRuntime(build(args, device), device)
    print(f"{device}, {Path(args.config).stem} at {args.image_size} px (random weights), batch "
          f"{args.batch_size}, {args.num_workers} loader workers; {args.images} images of "
          f"{w}x{h}", flush=True)
    list(Predictor(runtime, None, args.batch_size, 0, Tiling(args.sides[0]))(paths[:1]))  # warm
    for side in args.sides:
        predictor = Predictor(runtime, None, args.batch_size, args.num_workers, Tiling(side))
        began, tiles = time.perf_counter(), 0
        for result in predictor(paths):  # each map is on the CPU: the device is done with it
            tiles += result.tiles
        seconds = time.perf_counter() - began
        print(f"SIDE {side}: {tiles} tiles in {seconds:.2f} s: {tiles / seconds:.1f} tiles/s, "
              f"{args.images * w * h / 1e6 / seconds:.2f} megapixels/s", flush=True)
    print(f"peak memory {peak_memory(device)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.throughput:
            main_throughput(args, work)
            return 0
        if args.config:
            model = random_model(work, args.config, args.image_size)
        else:
            for path in (args.checkpoint_path, args.pretrained_path):
                if not Path(path).is_file():
                    sys.exit(f"error: {path} does not exist: run `make demo` first, or give "
                             "--checkpoint_path and --pretrained_path (or --config)")
            model = (args.checkpoint_path, args.pretrained_path)
        if args.huge:
            main_huge(args, work, model, threads)
        else:
            main_set(args, work, model, read_model(ModelSource(*model))[1].image_size, threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
