"""What few-shot, coreset and MuSc scoring cost (model/patch_scoring.py, model/coreset.py,
model/musc.py): time per image over the zero-shot forward, and the peak memory of MuSc and of a
coreset memory at ViT-L/14 shapes.

    python bench/patch_scoring.py                 # the demo backbone, 40 images at 128 px, CPU
    python bench/patch_scoring.py --images 5 --memory_images 5 --memory_patches 16 \
        --coreset_references 2                    # smoke

1. On ``--images`` random images of one product: the zero-shot forward per image; the reference
   score against K = 1, 2, 4 reference images and against all the images (K = all), whole and
   as a greedy coreset of ``--coreset`` of its patches (per image; the memory's forwards and
   the coreset's selection, once per product, are shown apart); MuSc (LNAMD and MSM at r = 1, 3,
   5, then RsCIN) over all the images.
2. MuSc's memory at ViT-L/14 shapes (``--memory_patches`` 1369 = 37x37 patches of 1024 dims,
   4 layers, float32, 518 px maps): the formula for 200 images, and a measurement on
   ``--memory_images`` images of random tokens in a fresh process (peak RSS growth), beside the
   formula for that many.
3. The reference memory of 200 references at the same shapes, whole and as a coreset of
   ``--coreset``: the formula, and a measurement of building it from ``--coreset_references``
   references' random tokens in a fresh process (peak RSS growth, time).

The last line compares the chunked MSM with the same maths done all at once (one [N*L, N*L]
similarity matrix per layer and r) on the images of part 1: ``speedup: 1.0x`` means that
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
from model.coreset import PROJECTION_DIM, coreset_size  # noqa: E402
from model.musc import MSM_FRACTION, MUSC_R, RSCIN_K, lnamd, musc_scores, rscin  # noqa: E402
from model.patch_scoring import (CHUNK_ELEMENTS, reference_memory,  # noqa: E402
                                 reference_score)
from tests.helpers.random_clip import random_clip_state_dict  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.json"))
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--features_list", type=int, nargs="+", default=None,
                   help="default: 4 evenly spaced layers (all if fewer, as demo.sh)")
    p.add_argument("--images", type=int, default=40, help="images of the product (part 1)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--coreset", type=float, default=0.1, help="coreset ratio (parts 1 and 3)")
    p.add_argument("--memory_images", type=int, default=6, help="part 2's measured run")
    p.add_argument("--memory_patches", type=int, default=1369, help="L of parts 2, 3 (ViT-L)")
    p.add_argument("--coreset_references", type=int, default=8, help="part 3's measured run")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def msm_all_at_once(layers: list[torch.Tensor], fraction: float, r_list) -> torch.Tensor:
    """The baseline: per layer and r, one [N*L, N*L] similarity matrix of the LNAMD features."""
    total = 0
    for tokens in layers:
        for r in r_list:
            f = lnamd(tokens, r)  # [N, L, C]
            n, length, width = f.shape
            sim = f.reshape(-1, width) @ f.reshape(-1, width).T  # [N*L, N*L]
            nearest = (2 * (1 - sim.view(n * length, n, length).amax(-1))).clamp_min(0).sqrt()
            nearest[torch.arange(n * length), torch.arange(n * length) // length] = torch.inf
            keep = int(fraction * (n - 1))
            total = total + nearest.topk(keep, dim=1, largest=False).values.mean(1)
    return total.view(n, length) / (len(layers) * len(r_list))


def musc_memory_bytes(n: int, length: int, width: int, layers: int, size: int = 518,
                      bytes_per: int = 4) -> dict:
    """MuSc's peak as test.py runs it: the product's raw tokens (class token included, kept per
    image until the product is complete), one layer stacked [N, 1+L, C], its LNAMD features
    [N, L, C], then either LNAMD's two temporaries of a few images or one similarity chunk and
    its nearest-distance table; the patch maps [N, S, S] come once the tokens' work is done."""
    per_chunk = min(n, max(1, CHUNK_ELEMENTS // (length * width)))
    per_key = max(1, min(n, CHUNK_ELEMENTS // (length * length)))
    rows = min(n * length, max(1, CHUNK_ELEMENTS // (per_key * length)))
    parts = {"tokens": n * (1 + length) * width * layers * bytes_per,
             "one stacked layer": n * (1 + length) * width * bytes_per,
             "LNAMD features": n * length * width * bytes_per,
             "LNAMD temporaries": 2 * per_chunk * length * width * bytes_per,
             "similarity chunk + nearest table": rows * per_key * length * bytes_per
             + rows * n * 4 * 2,
             "patch maps": n * size * size * 4}
    work = parts["one stacked layer"] + parts["LNAMD features"] + max(
        parts["LNAMD temporaries"], parts["similarity chunk + nearest table"])
    parts["peak"] = parts["tokens"] + max(work, parts["patch maps"])
    return parts


def coreset_memory_bytes(k: int, length: int, width: int, layers: int, ratio: float,
                         bytes_per: int = 4) -> dict:
    """Building the reference memory of K references (``utils/scoring/reference.py``): their
    patch tokens (all layers, kept per batch), one layer stacked whole [K*L, C] while its batches
    still exist (the peak) or while the greedy selection runs on its projection [K*L, 128] and a
    few [K*L] vectors; what is kept: per layer m = ratio * K * L patches."""
    m_total = k * length
    parts = {"tokens": m_total * width * layers * bytes_per,
             "one layer stacked": m_total * width * bytes_per,
             "projection + greedy's vectors": ((m_total + width) * PROJECTION_DIM * 4
                                               + m_total * 4 * 4) * (ratio < 1),
             "kept memory": layers * coreset_size(m_total, ratio) * width * bytes_per}
    parts["peak"] = parts["tokens"] + max(parts["one layer stacked"],
                                          parts["projection + greedy's vectors"])
    return parts


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measure_musc(n: int, length: int, width: int, layers: int, queue) -> None:
    """In a fresh process: peak RSS growth while scoring (the tokens already allocated; after a
    tiny warm-up run)."""
    musc_scores([torch.randn(5, 1 + 4, width)])
    per_image = [[torch.randn(1 + length, width) for _ in range(layers)] for _ in range(n)]
    before = _rss()
    stacked = (torch.stack([t[i] for t in per_image]) for i in range(layers))
    _, seconds = timed(lambda: musc_scores(stacked))
    queue.put((_rss() - before, seconds))


def _unit_tokens(k: int, length: int, width: int, layers: int) -> list[list[torch.Tensor]]:
    """Per layer, per batch of 8 (as memory_of holds them), random L2-normalized tokens [b,L,C],
    normalized in place (no temporary raises the peak before a measurement)."""
    out = [[] for _ in range(layers)]
    for start in range(0, k, 8):
        for layer in out:
            t = torch.randn(min(8, k - start), length, width)
            layer.append(t.div_(t.norm(dim=-1, keepdim=True)))
    return out


def _measure_coreset(k: int, length: int, width: int, layers: int, ratio: float,
                     queue) -> None:
    """In a fresh process: peak RSS growth and seconds while building the memory of K
    references at ``ratio`` from their tokens (after a tiny warm-up run)."""
    reference_memory([torch.cat(b) for b in _unit_tokens(2, 16, width, 1)], ratio)
    per_layer = _unit_tokens(k, length, width, layers)
    before = _rss()

    def stacked():
        while per_layer:
            yield torch.cat(per_layer.pop(0))
    memory, seconds = timed(lambda: reference_memory(stacked(), ratio))
    queue.put((_rss() - before, seconds, sum(m.numel() * 4 for m in memory)))


def in_fresh_process(target, *args):
    """``target(*args, queue)``'s result from a spawned process. Run before this process grows:
    Linux keeps a process's peak RSS across exec, so a child starts from its parent's."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def gib(parts: dict) -> str:
    return ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())


def main(argv=None) -> None:
    args = parse_args(argv)
    length = args.memory_patches
    measured_musc = (in_fresh_process(_measure_musc, args.memory_images, length, 1024, 4)
                     if args.memory_images >= 5 else None)
    measured_coreset = (in_fresh_process(_measure_coreset, args.coreset_references, length,
                                         1024, 4, args.coreset)
                        if args.coreset_references else None)
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
        outputs, forward = [], 0.0
        for batch in images.split(args.batch_size):
            maps, seconds = timed(lambda: model(batch.to(device)))
            forward += seconds
            outputs.append(maps)
        tokens = [torch.cat(t) for t in zip(*(o.patch_tokens for o in outputs))]  # [N, L, W]
        raw = [torch.cat(t) for t in zip(*(o.raw_tokens for o in outputs))]  # [N, 1+L, W]
        embeddings = torch.cat([o.image_features for o in outputs])  # [N, E]
        del outputs
        patches, width = tokens[0].shape[1:]
        print(f"{Path(args.config).stem} backbone, {args.image_size} px, L = {patches} patches x "
              f"{width} dims x {len(layers)} layers, {n} images, {args.device}, "
              f"{torch.get_num_threads()} threads")
        zero = 1000 * forward / n
        print(f"zero-shot forward: {zero:.1f} ms/image")

        def per_image(memory) -> float:  # ms per image of the reference score
            _, seconds = timed(lambda: [reference_score([t[b:b + args.batch_size]
                                                         for t in tokens], memory)
                                        for b in range(0, n, args.batch_size)])
            return 1000 * seconds / n

        for k in (1, 2, 4, n):
            ms = per_image(reference_memory([t[:k] for t in tokens]))
            name = f"K={k}" if k < n else f"K=all ({n})"
            print(f"reference {name}: +{ms:.2f} ms/image ({(zero + ms) / zero:.2f}x zero-shot), "
                  f"+{zero * k:.0f} ms per product for the memory's forwards")
        memory, build = timed(lambda: reference_memory(tokens, args.coreset))
        ms = per_image(memory)
        print(f"reference K=all ({n}), coreset {args.coreset:g} ({len(memory[0])} of {n * patches}"
              f" patches a layer): +{ms:.2f} ms/image ({(zero + ms) / zero:.2f}x zero-shot), "
              f"+{1000 * build:.0f} ms per product for the coreset")
        chunked, musc_seconds = timed(lambda: musc_scores(raw))
        image = chunked.amax(1)  # the patch maxima stand in for the upsampled maps'
        _, rscin_seconds = timed(lambda: rscin(image, embeddings, RSCIN_K))
        ms = 1000 * (musc_seconds + rscin_seconds) / n
        print(f"MuSc over {n} images: +{ms:.2f} ms/image ({(zero + ms) / zero:.2f}x zero-shot; "
              f"grows with the number of images), RsCIN {1000 * rscin_seconds:.1f} ms for all "
              f"{n}")
        baseline, all_at_once = timed(lambda: msm_all_at_once(raw, MSM_FRACTION, MUSC_R))
        assert (baseline - chunked).abs().max() < 1e-4

    big = musc_memory_bytes(200, 1369, 1024, 4)
    print(f"MuSc, 200 images at ViT-L/14 shapes (1369 x 1024 x 4 layers, float32): {gib(big)}; "
          f"all at once one layer's similarity matrix alone: {(200 * 1369) ** 2 * 4 / GIB:.0f} "
          "GiB")
    if measured_musc:
        m, (grown, seconds) = args.memory_images, measured_musc
        formula = musc_memory_bytes(m, length, 1024, 4)
        print(f"MuSc measured on {m} images of {length} x 1024 x 4 layers: peak RSS grew "
              f"{grown / MIB:.0f} MiB while scoring ({seconds:.1f} s); formula without the "
              f"tokens and maps: {(formula['peak'] - formula['tokens']) / MIB:.0f} MiB")
    for ratio in (1.0, args.coreset):
        print(f"reference memory of 200 references at ViT-L/14 shapes, coreset {ratio:g}: "
              f"{gib(coreset_memory_bytes(200, 1369, 1024, 4, ratio))}")
    if measured_coreset:
        k, (grown, seconds, kept) = args.coreset_references, measured_coreset
        formula = coreset_memory_bytes(k, length, 1024, 4, args.coreset)
        print(f"coreset {args.coreset:g} measured on {k} references of {length} x 1024 x 4 "
              f"layers: {seconds:.1f} s, peak RSS grew {grown / MIB:.0f} MiB while building, "
              f"{kept / MIB:.0f} MiB kept; formula without the tokens: "
              f"{(formula['peak'] - formula['tokens']) / MIB:.0f} MiB, kept "
              f"{formula['kept memory'] / MIB:.0f} MiB")
    print(f"MSM over {n} images all at once: {all_at_once:.2f} s, chunked (with LNAMD) "
          f"{musc_seconds:.2f} s")
    print(f"speedup: {all_at_once / musc_seconds:.1f}x")


if __name__ == "__main__":
    main()
