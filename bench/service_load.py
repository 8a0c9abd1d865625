"""The inspection service under load, on 127.0.0.1 only: ``app.py`` with the tiny random model in
a subprocess, page clients that each run jobs of two small images one after the other (posting,
polling incrementally, fetching an overlay) beside API clients calling ``POST /api/v1/predict``;
the same load again on a fresh server where every job and call names a product profile of
``--profile_references`` normal images; then, on a fresh server, one 13000x13000 upload with its
overlay and mask fetched; last, what a profile's reference memory costs at the shapes of
``--memory_config`` and ``--memory_size`` (ViT-L/14@336 at 518 px by default, random weights):
its build time (the references' forwards and the coreset's selection) and its size, for each
``--memory_references``, whole and as a coreset of ``--memory_coreset``.

    python bench/service_load.py [--clients 16] [--jobs 40] [--api_clients 8] [--api_calls 40]

Prints jobs done, failed and lost, p50/p95 latency per kind and the server's peak RSS (VmHWM) for
each load, the peak RSS of the big upload, the memory's costs; the last line is ``lost: N,
failed: M`` over both loads.
"""
from __future__ import annotations

import argparse
import sys
from argparse import Namespace
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import build  # noqa: E402
from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip, save_checkpoint  # noqa: E402
from model.coreset import coreset_size  # noqa: E402
from model.patch_scoring import reference_memory  # noqa: E402
from tests.helpers.http_client import Client  # noqa: E402
from tests.helpers.served import Served  # noqa: E402
from tests.helpers.random_clip import write_openai_archive  # noqa: E402
from utils.inference.runtime import TorchRuntime  # noqa: E402
from utils.scoring.reference import memory_bytes, memory_of  # noqa: E402

MIB = 2 ** 20


def tiny_model(folder: Path) -> list[str]:
    """The tiny random CLIP and a VCP checkpoint for it, profiles in ``folder``: app.py's
    flags."""
    archive = write_openai_archive(CLIPConfig.from_json(ROOT / "configs" / "tiny.json"),
                                   folder / "tiny.pt")
    torch.manual_seed(0)
    vcp = VCPConfig(features_list=(1, 2, 3, 4), image_size=56, total_d_layer_len=3)
    save_checkpoint(VCPCLIP(load_clip(archive, 56), vcp), folder / "tiny_vcp.pth")
    return ["--checkpoint_path", str(folder / "tiny_vcp.pth"), "--pretrained_path", str(archive),
            "--device", "cpu", "--profiles_dir", str(folder / "profiles")]


def random_images(folder: Path, count: int, side: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{k:03d}.png" for k in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(path)
    return paths


LOCK = threading.Lock()


def record(out: dict, kind: str, ok: bool, start: float) -> None:
    with LOCK:
        if ok:
            out[kind].append(time.monotonic() - start)
        else:
            out["failed"] += 1


def page_client(url: str, form: list, jobs: int, out: dict) -> None:
    """Jobs of ``form`` one after the other, as a page runs them; each must come back whole."""
    client = Client(url)
    images = [v for k, v in form if k == "images"]
    for _ in range(jobs):
        start = time.monotonic()
        try:
            job = client.run_job([("kind", "inspect"), *form], timeout=600, poll=0.1)
        except Exception:  # a refused post, a 404/410 while polling: a lost job
            with LOCK:
                out["lost"] += 1
            continue
        ok = job["state"] == "finished" and len(job["results"]) == len(images)
        ok = ok and client.request(f"/api/jobs/{job['id']}/overlay/0.png")[0] == 200
        record(out, "page", ok, start)


def api_client(url: str, form: list, calls: int, out: dict) -> None:
    client = Client(url)
    images = [v for k, v in form if k == "images"]
    for _ in range(calls):
        start = time.monotonic()
        status, body = client.json("/api/v1/predict", form=form)
        record(out, "api", status == 200 and len(body["images"]) == len(images)
               and all("verdict" in a for a in body["images"]), start)


def load(args, flags: list[str], work: Path, references: int = 0) -> dict:
    """The page and API clients on a fresh server; with ``references``, each job and call names
    a profile of that many normal images, made first."""
    images = random_images(work / "small", 2, 64)
    served = Served(flags, work / "tmp_load")
    form = [("images", p) for p in images]
    if references:
        status, body = Client(served.url).json("/api/v1/profiles/load", method="PUT", form=[
            ("references", p) for p in random_images(work / "normal", references, 64, seed=1)])
        assert status == 200, body
        form.append(("profile", "load"))
    out = {"page": [], "api": [], "failed": 0, "lost": 0}
    threads = [threading.Thread(target=page_client, args=(served.url, form, args.jobs, out))
               for _ in range(args.clients)]
    threads += [threading.Thread(target=api_client, args=(served.url, form, args.api_calls,
                                                          out)) for _ in range(args.api_clients)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["seconds"], out["rss"] = time.monotonic() - start, served.peak_rss()
    served.stop()
    return out


def big_upload(side: int, flags: list[str], work: Path) -> tuple[int, int]:
    """(peak RSS before, after) one side x side upload with its overlay and mask fetched."""
    path = work / "big.png"
    image = np.zeros((side, side, 3), np.uint8)
    image[:, : side // 2] = 200
    Image.fromarray(image).save(path)
    del image
    served = Served(flags, work / "tmp_big")
    client = Client(served.url)
    client.request("/")
    before = served.peak_rss()
    job = client.run_job([("kind", "inspect"), ("images", path)], timeout=600, poll=0.2)
    assert job["state"] == "finished" and job["results"], job
    for what in ("overlay/0.png", "mask/0.png?threshold=0.5"):
        assert client.request(f"/api/jobs/{job['id']}/{what}")[0] == 200
    after = served.peak_rss()
    served.stop()
    return before, after


def memory_cost(args, work: Path) -> list[str]:
    """A profile's reference memory at the shapes of ``--memory_config`` and ``--memory_size``
    (random weights): for each K of ``--memory_references``, its build time and size, whole and
    as a coreset. Up to ``--memory_forwards`` references go through the model (``memory_of``, as
    a profile's job builds it); beyond, the forwards' time is that rate times K (not measured)
    and the coreset is selected from random tokens of the same shapes."""
    torch.manual_seed(0)
    model = build(Namespace(config=args.memory_config, features_list=None,
                            image_size=args.memory_size), torch.device("cpu"))
    runtime = TorchRuntime(model, torch.device("cpu"))
    vision = model.clip.cfg
    patches = (args.memory_size // vision.patch_size) ** 2  # L
    lines = [f"reference memory at {Path(args.memory_config).stem} shapes, {args.memory_size} "
             f"px (L = {patches} patches x {vision.vision_width} dims x "
             f"{len(model.cfg.features_list)} layers, float32, random weights), CPU, "
             f"{torch.get_num_threads()} threads:"]
    measured = min(args.memory_forwards, max(args.memory_references))
    paths = random_images(work / "memory", measured, args.memory_size, seed=2)
    start = time.perf_counter()
    tokens = memory_of(paths, runtime, args.memory_size, args.batch_size)  # per layer [K*L, W]
    per_image = (time.perf_counter() - start) / measured
    for k in args.memory_references:
        if k <= measured:
            layers = [t[: k * patches] for t in tokens]
            how = f"{k} forwards measured at {per_image:.1f} s each"
        else:
            layers = [torch.randn(k * patches, t.shape[1]) for t in tokens]
            how = f"{k} forwards not run: {k * per_image:.0f} s at the rate measured"
        selected, seconds = timed(lambda: reference_memory(iter(layers), args.memory_coreset))
        whole, kept = (sum(t.numel() * t.element_size() for t in m) for m in (layers,
                                                                             selected))
        assert whole == memory_bytes(runtime, k) and kept == memory_bytes(runtime, k,
                                                                          args.memory_coreset)
        lines.append(f"  {k} references: whole {whole / MIB:.1f} MiB ({how}); coreset "
                     f"{args.memory_coreset:g} {kept / MIB:.1f} MiB "
                     f"({coreset_size(k * patches, args.memory_coreset)} of {k * patches} "
                     f"patches a layer), its selection {seconds:.1f} s more")
    return lines


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "none"
    p50, p95 = np.percentile(seconds, [50, 95])
    return f"{len(seconds)} done, p50 {p50:.2f} s, p95 {p95:.2f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--jobs", type=int, default=40, help="jobs per page client")
    p.add_argument("--api_clients", type=int, default=8)
    p.add_argument("--api_calls", type=int, default=40, help="calls per API client")
    p.add_argument("--big", type=int, default=13000, help="side of the big upload (0: none)")
    p.add_argument("--profile_references", type=int, default=8,
                   help="normal images of the profile of the second load (0: no second load)")
    p.add_argument("--memory_config", default=str(ROOT / "configs" / "ViT-L-14-336.json"),
                   help="the backbone of the memory's costs ('': not measured)")
    p.add_argument("--memory_size", type=int, default=518)
    p.add_argument("--memory_references", type=int, nargs="+", default=[8, 64])
    p.add_argument("--memory_forwards", type=int, default=8,
                   help="references run through the model (beyond: random tokens)")
    p.add_argument("--memory_coreset", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=8, help="the memory's forwards")
    args = p.parse_args(argv)
    lost = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flags = tiny_model(work)
        for references in sorted({0, args.profile_references}):
            out = load(args, flags, work, references)
            lost, failed = lost + out["lost"], failed + out["failed"]
            print(f"{args.clients} page clients x {args.jobs} jobs of 2 images, "
                  f"{args.api_clients} API clients x {args.api_calls} calls, "
                  + (f"a profile of {references} normal images: " if references else
                     "zero-shot: ") + f"{out['seconds']:.1f} s")
            print(f"  page jobs: {percentiles(out['page'])} (post, polls and an overlay)")
            print(f"  API calls: {percentiles(out['api'])}")
            print(f"  server peak RSS: {out['rss'] / 2**30:.2f} GiB")
        if args.big:
            before, after = big_upload(args.big, flags, work)
            print(f"one {args.big}x{args.big} upload, its overlay and mask fetched: server peak "
                  f"RSS {after / 2**30:.2f} GiB (at rest {before / 2**30:.2f} GiB)")
        if args.memory_config:
            print("\n".join(memory_cost(args, work)), flush=True)
    print(f"lost: {lost}, failed: {failed}")
    return 0 if lost == failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
