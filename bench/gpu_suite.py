"""The GPU measurements docs/performance.md still owes, in one run: (a) the tests marked ``gpu``,
(b) ``test.py`` end to end at dataset scale against its forward pass alone and the reference's
way, (c) the test forward compiled against eager, (d) tiled inference's throughput. Each step
runs as its own process, writes its whole output to ``<log_dir>/<step>.log``, and the run ends with
a summary of every step (also in ``<log_dir>/summary.txt``).

    python bench/gpu_suite.py --log_dir results/gpu_suite     # one GPU: ViT-L/14@336 at 518 px
    python bench/gpu_suite.py --device cpu --tiny             # the same steps in seconds

The full run is sized for about 8 minutes on one H100 (``--budget_s``): every step gets a share of
the budget, and time a step leaves unused goes to the steps after it; a step still running at its
deadline is stopped (its log keeps what it printed) and the summary says so. The exit status is 0
when every step finished with status 0 and printed the lines the summary reads. The shares are
estimates from the CPU runs and the earlier H100 numbers of docs/performance.md, not yet checked
on a GPU: (a) 45 s, (b) 285 s, (c) 150 s, (d) 60 s.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclass
class Step:
    """One measurement: its command, its share of the budget, and the lines the summary takes
    from its log (a line is found by the regular expression it starts with)."""
    name: str
    what: str
    command: list[str]
    share_s: float
    keep: tuple[str, ...]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (--tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="configs/tiny.json, 56 px, a few images: checks that every step runs")
    p.add_argument("--log_dir", default=str(ROOT / "results" / "gpu_suite"))
    p.add_argument("--budget_s", type=float, default=None,
                   help="seconds for the whole run (default 480; 300 with --tiny)")
    p.add_argument("--products", type=int, default=2,
                   help="products of 115 images at 518 px in step (b) (default 2: 230 images)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not cuda_available():
        p.error(f"--device {args.device}: this machine has no CUDA device "
                "(--device cpu --tiny checks the steps)")
    args.budget_s = args.budget_s or (300.0 if args.tiny else 480.0)
    return args


def gpu_tests(args) -> Step:
    """(a) every test marked gpu (skipped without CUDA), collected from the test files that use
    the marker: the others need packages a GPU machine may lack (the web server's, Selenium)."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                   if "mark.gpu" in p.read_text())
    return Step("gpu_tests", "tests marked gpu",
                [PYTHON, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                share_s=45, keep=(r"\d+ (passed|skipped|failed|error)",))


def pipeline(args, work: Path) -> Step:
    """(b) bench/test_pipeline.py: test.py end to end, its forward pass alone, the reference's
    way, each stage's time. Estimated for 2 products of 115 images (``--products``): about 35 s
    to write and load the random ViT-L/14@336 four times, 7 s per product to generate its
    images, ~10 s per product for ours and the forward pass alone, and the reference's metrics at
    0.76 s of CPU per image (docs/performance.md), ~90 s per product."""
    sizes = (["--config", "configs/tiny.json", "--products", "2", "--images", "4", "--size", "56"]
             if args.tiny else ["--config", "configs/ViT-L-14-336.json", "--products",
                                str(args.products), "--images", "115", "--size", "518"])
    return Step("pipeline", "test.py end to end vs forward only vs the reference's way",
                [PYTHON, "bench/test_pipeline.py", "--device", args.device, "--work_dir",
                 str(work / "pipeline"), *sizes],
                share_s=285, keep=(r"\d+ products", "forward only:", r"ours \(test\.py\):",
                                   "reference way:", "speedup:"))


def forward(args) -> Step:
    """(c) bench/forward.py --compile: eager fp16 against torch.compile (default mode, and
    reduce-overhead's CUDA graphs on CUDA) at batch 32, after the eager measurements it always
    makes (~30 s with building the model); the two compilations of ViT-L are the unknown part.
    Inductor took ~40 s to compile even the tiny model on a 2-core CPU, so the tiny run checks the
    path with the aot_eager backend (dynamo and AOTAutograd, eager kernels: ~2-5 s)."""
    sizes = (["--config", "configs/tiny.json", "--image_size", "56", "--batch_size", "2",
              "--iters", "1", "--warmup", "0", "--features_list", "1", "2", "3", "4",
              "--compile_backend", "aot_eager"]
             if args.tiny else ["--config", "configs/ViT-L-14-336.json", "--image_size", "518",
                                "--batch_size", "32"])
    return Step("forward", "test forward: eager vs torch.compile",
                [PYTHON, "bench/forward.py", "--device", args.device, "--compile", *sizes],
                share_s=150, keep=("device ", "test forward:", "training step:", "eager:",
                                   r"compiled \(", "compile criterion", "speedup:"))


def tiling(args, work: Path) -> Step:
    """(d) bench/tiling.py --throughput: predict.py's service on 8 generated 4000x3000 images
    with tiles of 518 and 1036 px, ViT-L/14@336 at 518 px (random weights), batch 32, 4 loader
    workers: tiles/s and megapixels/s, reading the images and stitching included. About 20 s to
    build the model and write the images, then 640 + 160 tiles at ~300 tiles/s (the forward
    rate of docs/performance.md) if the loader and the stitching keep up."""
    sizes = (["--config", "configs/tiny.json", "--image_size", "56", "--throughput", "400x300",
              "--sides", "56", "112", "--images", "2", "--batch_size", "8"]
             if args.tiny else ["--config", "configs/ViT-L-14-336.json", "--image_size", "518",
                                "--throughput", "4000x3000", "--sides", "518", "1036",
                                "--images", "8", "--batch_size", "32", "--num_workers", "4"])
    return Step("tiling", "tiled inference: tiles/s and megapixels/s",
                [PYTHON, "bench/tiling.py", "--device", args.device, "--work_dir",
                 str(work / "tiling"), *sizes],
                share_s=60, keep=(r"SIDE \d+:", "peak memory"))


def steps(args, work: Path) -> list[Step]:
    """The steps in order, their shares scaled to the budget; ``work`` holds their data."""
    chosen = [gpu_tests(args), pipeline(args, work), forward(args), tiling(args, work)]
    total = sum(s.share_s for s in chosen)
    for s in chosen:
        s.share_s *= args.budget_s / total
    return chosen


def run_step(step: Step, log: Path, timeout: float, env: dict) -> tuple[str, float]:
    """Runs ``step`` with its output in ``log``; ``(status, seconds)``, status ``ok``,
    ``exit N`` or ``stopped at its deadline``. The step's whole process group is stopped."""
    start = time.perf_counter()
    with open(log, "w") as out:
        out.write("$ " + " ".join(step.command) + "\n")
        out.flush()
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return "stopped at its deadline", time.perf_counter() - start
    return ("ok" if code == 0 else f"exit {code}"), time.perf_counter() - start


def kept_lines(step: Step, text: str) -> tuple[list[str], list[str]]:
    """``(lines the summary keeps, patterns that found no line)`` of a step's log."""
    lines = text.splitlines()
    found, missing = [], []
    for pattern in step.keep:
        hits = [line.strip() for line in lines if re.match(pattern, line.strip())]
        found += hits
        missing += [] if hits else [pattern]
    return found, missing


def cuda_available() -> bool:
    import torch  # here only: the suite's own process needs no torch on a CPU
    return torch.cuda.is_available()


def device_line(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return f"{torch.cuda.get_device_name(torch.device(device))}, CUDA {torch.version.cuda}"
    return f"CPU, {os.cpu_count()} cores"


def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"GPU suite on {device_line(args.device)}, PyTorch {version('torch')}; "
          f"{'tiny' if args.tiny else 'full'} run, budget {args.budget_s:.0f} s; logs in {log_dir}",
          flush=True)
    # unbuffered: a stopped step's log keeps what it printed; one intra-op thread in the tiny
    # run, whose numbers mean nothing, so that a busy small CPU does not stall its tiny kernels
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": "1"} if args.tiny else {})}
    start, summary, failed = time.perf_counter(), [], []
    # the steps' data (a stopped step cannot clean up after itself) is removed here
    with tempfile.TemporaryDirectory(prefix="gpu_suite_") as work:
        deadline = 0.0
        for step in steps(args, Path(work)):
            deadline += step.share_s
            print(f"[{step.name}] {step.what} ...", flush=True)
            log = log_dir / f"{step.name}.log"
            status, seconds = run_step(step, log, deadline - (time.perf_counter() - start), env)
            found, missing = kept_lines(step, log.read_text())
            if status != "ok" or missing:
                failed.append(step.name)
            summary.append(f"{step.name}: {status} in {seconds:.1f} s ({step.what})"
                           + (f"; no line matching {missing}" if missing else ""))
            summary += [f"  {line}" for line in found]
    summary.append(f"total: {time.perf_counter() - start:.1f} s of a {args.budget_s:.0f} s "
                   "budget; " + (f"failed: {', '.join(failed)}" if failed else "every step ok"))
    print("== summary ==")
    print("\n".join(summary))
    (log_dir / "summary.txt").write_text("\n".join(summary) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
