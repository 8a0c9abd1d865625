"""What few-shot and mutual scoring cost (model/patch_scoring.py): time per image over the
zero-shot forward, and the peak memory of mutual scoring at ViT-L/14 shapes.

    python bench/patch_scoring.py                 # the demo backbone, 40 images at 128 px, CPU
    python bench/patch_scoring.py --images 4 --memory_images 2 --memory_patches 16   # smoke

1. On ``--images`` random images of one product: the zero-shot forward per image; the reference
   score against K = 1, 2, 4 reference images (per image; the memory's K forwards, once per
   product, are shown apart); the mutual score over all the images.
2. Mutual scoring's memory at ViT-L/14 shapes (``--memory_patches`` 1369 = 37x37 patches of
   1024 dims, 4 layers, float32): the formula for 200 images, and a measurement on
   ``--memory_images`` images of random tokens in a fresh process (peak RSS growth), beside the
   formula for that many.

The last line compares the chunked mutual score with the same maths done all at once (one
[N*L, N*L] similarity matrix per layer) on the images of part 1: ``speedup: 1.0x`` means that
chunking costs no time.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import evenly_spaced_layers  # noqa: E402
from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip  # noqa: E402
from model.patch_scoring import (CHUNK_ELEMENTS, MUTUAL_FRACTION, mutual_score,  # noqa: E402
                                 reference_memory, reference_score)
from tests.helpers.random_clip import random_clip_state_dict  # noqa: E402

GIB = 2 ** 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.json"))
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--features_list", type=int, nargs="+", default=None,
                   help="default: 4 evenly spaced layers (all if fewer, as demo.sh)")
    p.add_argument("--images", type=int, default=40, help="images of the product (part 1)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--memory_images", type=int, default=6, help="part 2's measured run")
    p.add_argument("--memory_patches", type=int, default=1369, help="L of part 2 (ViT-L: 1369)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def mutual_all_at_once(layers: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The baseline: per layer one [N*L, N*L] similarity matrix, no chunks."""
    total = 0
    for t in layers:
        n, length, width = t.shape
        sim = t.reshape(-1, width) @ t.reshape(-1, width).T  # [N*L, N*L]
        nearest = 1.0 - sim.view(n * length, n, length).amax(-1)  # [N*L, N]
        nearest[torch.arange(n * length), torch.arange(n * length) // length] = torch.inf
        keep = max(1, round(fraction * (n - 1)))
        total = total + nearest.topk(keep, dim=1, largest=False).values.mean(1).view(n, length)
    return total / len(layers)


def mutual_memory_bytes(n: int, length: int, width: int, layers: int, bytes_per: int = 4) -> dict:
    """Mutual scoring's peak, as test.py runs it: the product's tokens (kept per image), one layer
    stacked [N, L, W], one similarity chunk, the [rows, N] nearest-distance table."""
    per_key = max(1, min(n, CHUNK_ELEMENTS // (length * length)))
    rows = min(n * length, max(1, CHUNK_ELEMENTS // (per_key * length)))
    parts = {"tokens": n * length * width * layers * bytes_per,
             "one stacked layer": n * length * width * bytes_per,
             "similarity chunk": rows * per_key * length * bytes_per,
             "nearest table": rows * n * 4 * 2}
    parts["total"] = sum(parts.values())
    return parts


def _measure(n: int, length: int, width: int, layers: int, queue) -> None:
    """In a fresh process: peak RSS growth while scoring (the tokens already allocated)."""
    per_image = [[torch.nn.functional.normalize(torch.randn(length, width), dim=-1)
                  for _ in range(layers)] for _ in range(n)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    stacked = (torch.stack([t[i] for t in per_image]) for i in range(layers))
    _, seconds = timed(lambda: mutual_score(stacked))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put((after - before, seconds))


def measure_in_fresh_process(m: int, length: int) -> tuple[int, float]:
    """(peak RSS growth, seconds) of ``_measure``. Run before this process grows: Linux keeps a
    process's peak RSS across exec, so a child starts from its parent's."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=_measure, args=(m, length, 1024, 4, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    measured = (measure_in_fresh_process(args.memory_images, args.memory_patches)
                if args.memory_images >= 2 else None)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = CLIPConfig.from_json(args.config)
    n_layers = cfg.vision_layers
    layers = tuple(args.features_list or (evenly_spaced_layers(n_layers) if n_layers >= 4
                                          else range(1, n_layers + 1)))  # demo.sh: 1 2
    vcp = VCPConfig(features_list=layers, image_size=args.image_size,
                    total_d_layer_len=cfg.text_layers - 1)
    model = VCPCLIP(load_clip(random_clip_state_dict(cfg), args.image_size), vcp)
    model = model.to(device).eval()
    images = torch.randn(args.images, 3, args.image_size, args.image_size)
    n = args.images

    with torch.inference_mode():
        model(images[:2].to(device))  # warm-up
        tokens, forward = [], 0.0
        for batch in images.split(args.batch_size):
            maps, seconds = timed(lambda: model(batch.to(device)))
            forward += seconds
            tokens.append(maps.patch_tokens)
        per_layer = [torch.cat(t) for t in zip(*tokens)]  # [N, L, W] per layer
        length, width = per_layer[0].shape[1:]
        print(f"{Path(args.config).stem} backbone, {args.image_size} px, L = {length} patches x "
              f"{width} dims x {len(layers)} layers, {n} images, {args.device}, "
              f"{torch.get_num_threads()} threads")
        zero = 1000 * forward / n
        print(f"zero-shot forward: {zero:.1f} ms/image")
        for k in (1, 2, 4):
            memory = reference_memory([t[:k] for t in per_layer])  # K images' tokens
            build = 1000 * forward / n * k  # the memory's K forwards, once per product
            _, seconds = timed(lambda: [reference_score([t[b:b + args.batch_size] for t in
                                                         per_layer], memory)
                                        for b in range(0, n, args.batch_size)])
            ms = 1000 * seconds / n
            print(f"reference K={k}: +{ms:.2f} ms/image ({(zero + ms) / zero:.2f}x zero-shot), "
                  f"+{build:.0f} ms per product for the memory")
        chunked, mutual_seconds = timed(lambda: mutual_score(per_layer))
        ms = 1000 * mutual_seconds / n
        print(f"mutual over {n} images: +{ms:.2f} ms/image ({(zero + ms) / zero:.2f}x zero-shot; "
              f"grows with the number of images)")
        baseline, all_at_once = timed(lambda: mutual_all_at_once(per_layer, MUTUAL_FRACTION))
        assert (baseline - chunked).abs().max() < 1e-4

    big = mutual_memory_bytes(200, 1369, 1024, 4)
    print("mutual, 200 images at ViT-L/14 shapes (1369 x 1024 x 4 layers, float32): peak "
          + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in big.items())
          + f"; all at once one layer's similarity matrix alone: "
          f"{(200 * 1369) ** 2 * 4 / GIB:.0f} GiB")
    if measured:
        m, (grown, seconds) = args.memory_images, measured
        formula = mutual_memory_bytes(m, args.memory_patches, 1024, 4)
        print(f"measured on {m} images of {args.memory_patches} x 1024 x 4 layers: peak RSS grew "
              f"{grown / 2**20:.0f} MiB while scoring ({seconds:.1f} s); formula without the "
              f"tokens: {(formula['total'] - formula['tokens']) / 2**20:.0f} MiB")
    print(f"mutual over {n} images all at once: {all_at_once:.2f} s, "
          f"chunked {mutual_seconds:.2f} s")
    print(f"speedup: {all_at_once / mutual_seconds:.1f}x")


if __name__ == "__main__":
    main()
