"""Speed and memory of the VCP-CLIP test forward, a training step, and batched vs per-image text
encoding, with random weights of the real shapes.

    python bench/forward.py                                   # ViT-L/14@336 at 518 px on a GPU
    python bench/forward.py --config configs/tiny.json --image_size 112 --batch_size 4   # CPU

The last line compares the batched prompted text encoding with the reference's loop over images
and templates (one sequence at a time): ``speedup: <ratio>x`` (docs/performance.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build, peak_memory, per_image_text, timed  # noqa: E402
from utils.device import autocast  # noqa: E402
from model.losses import segmentation_loss  # noqa: E402


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
    return p.parse_args(argv)


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
          f"per-image loop {tl * 1000:.1f} ms (max |diff| {diff:.1e})")
    print(f"speedup: {tl / tb:.1f}x")


if __name__ == "__main__":
    main()
