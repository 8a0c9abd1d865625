"""The inspection service under load, on 127.0.0.1 only: ``app.py`` with the tiny random model in
a subprocess, page clients that each run jobs of two small images one after the other (posting,
polling incrementally, fetching an overlay) beside API clients calling ``POST /api/v1/predict``;
then, on a fresh server, one 13000x13000 upload with its overlay and mask fetched.

    python bench/service_load.py [--clients 16] [--jobs 40] [--api_clients 8] [--api_calls 40]

Prints jobs done, failed and lost, p50/p95 latency per kind, the server's peak RSS (VmHWM), and
the peak RSS of the big upload; the last line is ``lost: N, failed: M``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model import CLIPConfig, VCPCLIP, VCPConfig, load_clip, save_checkpoint  # noqa: E402
from tests.helpers.http_client import Client  # noqa: E402
from tests.helpers.served import Served  # noqa: E402
from tests.helpers.random_clip import write_openai_archive  # noqa: E402


def tiny_model(folder: Path) -> list[str]:
    """The tiny random CLIP and a VCP checkpoint for it: the model flags of app.py."""
    archive = write_openai_archive(CLIPConfig.from_json(ROOT / "configs" / "tiny.json"),
                                   folder / "tiny.pt")
    torch.manual_seed(0)
    vcp = VCPConfig(features_list=(1, 2, 3, 4), image_size=56, total_d_layer_len=3)
    save_checkpoint(VCPCLIP(load_clip(archive, 56), vcp), folder / "tiny_vcp.pth")
    return ["--checkpoint_path", str(folder / "tiny_vcp.pth"), "--pretrained_path", str(archive),
            "--device", "cpu"]


LOCK = threading.Lock()


def record(out: dict, kind: str, ok: bool, start: float) -> None:
    with LOCK:
        if ok:
            out[kind].append(time.monotonic() - start)
        else:
            out["failed"] += 1


def page_client(url: str, images: list[Path], jobs: int, out: dict) -> None:
    """Jobs one after the other, as a page runs them; each must come back whole."""
    client = Client(url)
    for _ in range(jobs):
        start = time.monotonic()
        try:
            job = client.run_job([("kind", "inspect"), *[("images", p) for p in images]],
                                 timeout=600, poll=0.1)
        except Exception:  # a refused post, a 404/410 while polling: a lost job
            with LOCK:
                out["lost"] += 1
            continue
        ok = job["state"] == "finished" and len(job["results"]) == len(images)
        ok = ok and client.request(f"/api/jobs/{job['id']}/overlay/0.png")[0] == 200
        record(out, "page", ok, start)


def api_client(url: str, images: list[Path], calls: int, out: dict) -> None:
    client = Client(url)
    for _ in range(calls):
        start = time.monotonic()
        status, body = client.json("/api/v1/predict", form=[("images", p) for p in images])
        record(out, "api", status == 200 and len(body["images"]) == len(images)
               and all("verdict" in a for a in body["images"]), start)


def load(args, flags: list[str], work: Path) -> dict:
    rng = np.random.default_rng(0)
    images = []
    for k in range(2):
        images.append(work / f"small{k}.png")
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images[-1])
    served = Served(flags, work / "tmp_load")
    out = {"page": [], "api": [], "failed": 0, "lost": 0}
    threads = [threading.Thread(target=page_client, args=(served.url, images, args.jobs, out))
               for _ in range(args.clients)]
    threads += [threading.Thread(target=api_client, args=(served.url, images, args.api_calls,
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
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        flags = tiny_model(work)
        out = load(args, flags, work)
        print(f"{args.clients} page clients x {args.jobs} jobs of 2 images, {args.api_clients} "
              f"API clients x {args.api_calls} calls: {out['seconds']:.1f} s")
        print(f"  page jobs: {percentiles(out['page'])} (post, polls and an overlay)")
        print(f"  API calls: {percentiles(out['api'])}")
        print(f"  server peak RSS: {out['rss'] / 2**30:.2f} GiB")
        if args.big:
            before, after = big_upload(args.big, flags, work)
            print(f"one {args.big}x{args.big} upload, its overlay and mask fetched: server peak "
                  f"RSS {after / 2**30:.2f} GiB (at rest {before / 2**30:.2f} GiB)")
    print(f"lost: {out['lost']}, failed: {out['failed']}")
    return 0 if out["lost"] == out["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
