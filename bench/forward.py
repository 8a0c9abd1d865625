"""Speed and memory of the VCP-CLIP test forward, a training step, batched vs per-image text
encoding and, with ``--compile``, the compiled test forward against eager, with random weights of
the real shapes.

    python bench/forward.py                                   # ViT-L/14@336 at 518 px on a GPU
    python bench/forward.py --config configs/tiny.json --image_size 112 --batch_size 4   # CPU
    python bench/forward.py --compile --no_train_step         # + torch.compile, on a GPU

``--compile`` times ``torch.compile`` of the test forward (images -> the two abnormal maps, the
upsampling included) in each of ``--compile_modes`` (default: "default" and, on CUDA only,
"reduce-overhead", which adds CUDA graphs) against eager in the same run: images/s, peak memory,
the first call's seconds (where the compilation happens), the graphs and graph breaks dynamo
found, and the max |diff| of the raw and new maps to eager's.

The last line is ``speedup: <ratio>x``: without ``--compile``, the batched prompted text encoding
over the reference's loop over images and templates (one sequence at a time); with it, eager's
seconds per batch over the fastest compiled mode's (docs/performance.md).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build, peak_memory, per_image_text, timed  # noqa: E402
from utils.device import autocast  # noqa: E402
from model.losses import segmentation_loss  # noqa: E402

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MIN_GAIN, MAX_DIFF = 1.10, 1e-3  # what would earn the runtimes a --compile (docs/performance.md)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ViT-L-14-336.json")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="default fp16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--features_list", type=int, nargs="+", default=None,
                   help="default: 4 layers evenly spaced, the last one included")
    p.add_argument("--no_train_step", action="store_true")
    g = p.add_argument_group("compiled vs eager")
    g.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the test forward against eager")
    g.add_argument("--compile_modes", nargs="+", default=None, choices=COMPILE_MODES,
                   help="default: default and, on CUDA, reduce-overhead (CUDA graphs)")
    g.add_argument("--compile_backend", default="inductor",
                   help="torch.compile's backend (aot_eager: a quick check on a CPU)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.compile_modes = args.compile_modes or (["default", "reduce-overhead"] if cuda
                                                else ["default"])
    if not cuda and set(args.compile_modes) - {"default"}:
        p.error(f"--compile_modes {' '.join(args.compile_modes)}: on {args.device} only default")
    return args


def maps_forward(model):
    """The function compiled and timed: images [B,3,S,S] -> (raw, new) maps, each [B,S,S]."""
    def run(images):
        return model(images).abnormal()
    return run


def run_mode(fn, images, device, precision, args) -> dict:
    """One way of running ``fn``: the first call's seconds (a compiled function compiles there),
    seconds per batch after warm-up, peak memory, and its maps (float32 copies: CUDA graphs
    overwrite their outputs on the next replay)."""
    step_begin = getattr(torch.compiler, "cudagraph_mark_step_begin", lambda: None)  # torch>=2.2

    def call():
        step_begin()  # each call a new step for CUDA graphs (reduce-overhead)
        with torch.inference_mode(), autocast(device, precision):
            return fn(images)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    call()
    sync()
    first = time.perf_counter() - start
    seconds = timed(call, device, args.iters, args.warmup)
    maps = [m.float().clone() for m in call()]  # [B, S, S] raw, new
    return dict(first=first, seconds=seconds, peak=peak_memory(device), maps=maps)


def compiled(model, mode: str, backend: str):
    """A fresh ``torch.compile`` of the test forward (dynamo's caches and counters reset)."""
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(maps_forward(model), backend=backend,
                         mode=None if mode == "default" else mode)


def compare_compiled(model, images, device, precision, args) -> float:
    """Eager against each compiled mode, one line each; returns eager's seconds per batch over
    the fastest mode's."""
    b = images.shape[0]
    eager = run_mode(maps_forward(model), images, device, precision, args)
    print(f"eager: {b / eager['seconds']:.1f} images/s ({eager['seconds'] * 1000:.0f} ms/batch), "
          f"peak memory {eager['peak']}", flush=True)
    times, met = {}, []
    for mode in args.compile_modes:
        r = run_mode(compiled(model, mode, args.compile_backend), images, device, precision, args)
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        diffs = [(c - e).abs().max().item() for c, e in zip(r["maps"], eager["maps"])]
        times[mode] = r["seconds"]
        if eager["seconds"] / r["seconds"] > MIN_GAIN and max(diffs) <= MAX_DIFF:
            met.append(mode)
        print(f"compiled ({args.compile_backend}, mode {mode}): {b / r['seconds']:.1f} images/s "
              f"({r['seconds'] * 1000:.0f} ms/batch, {eager['seconds'] / r['seconds']:.2f}x "
              f"eager), first call {r['first']:.1f} s, peak memory {r['peak']}, {graphs} graphs, "
              f"{breaks} graph breaks; maps vs eager max |diff| raw {diffs[0]:.1e}, "
              f"new {diffs[1]:.1e}", flush=True)
    print(f"compile criterion (> {MIN_GAIN:.2f}x eager, maps within {MAX_DIFF:.0e}): "
          + (f"met by {', '.join(met)}" if met else "not met"))
    return eager["seconds"] / min(times.values())


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    precision = args.precision or ("fp16" if device.type == "cuda" else "fp32")
    print(f"device {name}, {Path(args.config).stem} at {args.image_size} px, "
          f"batch {args.batch_size}, {precision}")
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)

    def forward(per_image: bool | None = None):
        with torch.inference_mode(), autocast(device, precision):
            model(images).abnormal(per_image)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = timed(forward, device, args.iters, args.warmup)
    print(f"test forward: {args.batch_size / t:.1f} images/s ({t * 1000:.0f} ms/batch), "
          f"peak memory {peak_memory(device)}")
    one, whole = (timed(lambda: forward(p), device, args.iters, args.warmup) for p in (True, False))
    print(f"test forward with the maps made one image at a time {one * 1000:.0f} ms/batch, for the "
          f"whole batch at once {whole * 1000:.0f} ms/batch ({whole / one:.2f}x)")

    if precision != "fp32":  # what autocast changes in the maps themselves
        with torch.inference_mode():
            exact = model(images[:2]).abnormal()
            with autocast(device, precision):
                low = model(images[:2]).abnormal()
        diffs = [(a - b.float()).abs().max().item() for a, b in zip(exact, low)]
        print(f"{precision} vs fp32 maps: max |diff| raw {diffs[0]:.1e}, new {diffs[1]:.1e}")

    if not args.no_train_step:
        model.train()
        params = [p for m in model.trainable_modules().values() for p in m.parameters()
                  if p.requires_grad]
        opt = torch.optim.Adam(params, lr=1e-5, betas=(0.5, 0.999))
        masks = (torch.rand(args.batch_size, 1, args.image_size, args.image_size,
                            device=device) > 0.9).float()

        def step():
            with autocast(device, precision):
                maps = model(images)
            loss = segmentation_loss([m.float() for m in maps.raw + maps.new], masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = timed(step, device, args.iters, args.warmup)
        print(f"training step: {t * 1000:.0f} ms at batch {args.batch_size}, "
              f"peak memory {peak_memory(device)}")
        model.eval()

    feats = torch.randn(args.batch_size, model.clip.cfg.embed_dim, device=device)

    def batched():
        with torch.inference_mode(), autocast(device, precision):
            model.encode_text(feats)

    def looped():
        with torch.inference_mode(), autocast(device, precision):
            per_image_text(model, feats)
    with torch.inference_mode():
        diff = (model.encode_text(feats) - per_image_text(model, feats)).abs().max().item()
    tb = timed(batched, device, args.iters, args.warmup)
    tl = timed(looped, device, args.iters, args.warmup)
    print(f"text encoding of {args.batch_size} images x 2 templates: batched {tb * 1000:.1f} ms, "
          f"per-image loop {tl * 1000:.1f} ms ({tl / tb:.1f}x, max |diff| {diff:.1e})", flush=True)
    ratio = compare_compiled(model, images, device, precision, args) if args.compile else tl / tb
    print(f"speedup: {ratio:.1f}x")


if __name__ == "__main__":
    main()
