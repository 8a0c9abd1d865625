"""ONNX Runtime vs PyTorch on the CPU: images per second of the test forward (images -> raw, new
maps), random weights of the real shapes, the same thread count for both.

    python bench/deploy.py                                     # ViT-L/14@336 at 518 px, batch 1
    python bench/deploy.py --config configs/tiny.json --image_size 518 --batch_size 4

The model is exported the way export.py exports it (fp32, dynamic batch). The last line is ONNX
Runtime's images/s over PyTorch's (``speedup: <ratio>x``; docs/export.md has measured values).
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import build, timed  # noqa: E402
from utils.inference.onnx_runtime import (AbnormalMaps, ONNX_INPUT, ONNX_OUTPUTS, export_program,  # noqa: E402
                                 save_program, template_vocabulary)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/ViT-L-14-336.json")
    p.add_argument("--image_size", type=int, default=518)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="intra-op threads of both runtimes (default: PyTorch's)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--features_list", type=int, nargs="+", default=None,
                   help="default: 4 layers evenly spaced, the last one included")
    return p.parse_args(argv)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines
                 if line.startswith("model name")), platform.processor() or "CPU")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    maps = AbnormalMaps(template_vocabulary(build(args, cpu)))
    print(f"{cpu_name()}, {args.threads} threads; {Path(args.config).stem} at {args.image_size} "
          f"px, batch {args.batch_size}, fp32")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = Path(tmp) / "model.onnx"
        save_program(export_program(maps, args.image_size, None), path)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir())
        print(f"export: {time.perf_counter() - start:.0f} s, {size / 2**20:.0f} MiB")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        print(f"ONNX Runtime {ort.__version__} session: {time.perf_counter() - start:.0f} s")
        images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
        feed = {ONNX_INPUT: images.numpy()}

        def pytorch():
            with torch.inference_mode():
                return maps(images)

        def onnxruntime():
            return session.run(list(ONNX_OUTPUTS), feed)
        diff = max(np.abs(o - t.numpy()).max() for o, t in zip(onnxruntime(), pytorch()))
        t_torch = timed(pytorch, cpu, args.iters, args.warmup)
        t_ort = timed(onnxruntime, cpu, args.iters, args.warmup)
    print(f"PyTorch {torch.__version__}: {args.batch_size / t_torch:.3g} images/s "
          f"({t_torch * 1000:.0f} ms/batch)")
    print(f"ONNX Runtime: {args.batch_size / t_ort:.3g} images/s ({t_ort * 1000:.0f} ms/batch), "
          f"max |diff| of the maps {diff:.1e}")
    print(f"speedup: {t_torch / t_ort:.1f}x")


if __name__ == "__main__":
    main()
