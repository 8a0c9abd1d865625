"""The inspection service: a page to drop images, see their heat maps and verdicts, set and
calibrate the threshold, and an HTTP API for the line (``POST /api/v1/predict``).

    python app.py --checkpoint_path vcp_weight/train_visa.pth [--host 127.0.0.1] [--port 7860]
    python app.py ... --host 0.0.0.0 --allowed_host inspect3.plant.local --allow_folder /data/line3
    make app          # with the demo's checkpoint, after `make demo`

The service itself is the library's (``utils/serving/service.py``: jobs, the fair queue, limits,
shared folders, a job's own scoring; ``utils/serving/profiles.py``: the product profiles under
``--profiles_dir``; ``utils/serving/web.py``: the HTTP side and its checks); images go through the
``Predictor`` that ``predict.py`` runs. This script parses the flags, listens, prints the address
and serves.

Safe by default (docs/app.md): loopback only; no server folder is readable unless
``--allow_folder`` names it; listening beyond loopback needs a token (printed at start, or
``--token``), and the ``Host`` header must be a loopback name or an ``--allowed_host``. A request
must arrive within its deadlines (``--header_timeout``, ``--min_body_rate``), connections are
capped (``--max_connections``), and the open-file limit is raised to the system's at start, so
slow clients cannot starve the server (``utils/serving/connections.py``).
"""
from __future__ import annotations

import argparse
import ipaddress
import secrets
import socket
import sys
from pathlib import Path

import uvicorn

from utils.cli import (INPUT_ERRORS, ArgumentParser, add_model_flags, add_onnx_flag,
                       add_scoring_flags, add_tile_flags, at_least, check_output_folder, fail,
                       positive, predictor_of, strategy_options)
from utils.errors import UsageError
from utils.paths import DEFAULT_CHECKPOINT
from utils.serving.connections import ConnectionLimits, protocol_for, raise_open_file_limit
from utils.serving.profiles import ProfileLimits, Profiles
from utils.serving.service import MiB, Limits, Service
from utils.serving.web import LOOPBACK, Access, create_app


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="The inspection service: a page of images, heat maps, "
                                   "verdicts and the threshold, and an HTTP API")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=at_least(0), default=7860, help="default 7860; 0: any free one")
    p.add_argument("--threshold", type=float, default=0.5, help="the slider's first position")
    p.add_argument("--batch_size", type=at_least(1), default=8)
    s = p.add_argument_group("access and limits (docs/app.md)")
    s.add_argument("--allow_folder", action="append", default=[], metavar="DIR",
                   help="a folder on the server whose images the page may read (repeat it; "
                        "none by default: uploads only)")
    s.add_argument("--allowed_host", action="append", default=[], metavar="NAME",
                   help="a host name the server answers to besides loopback's (repeat it)")
    s.add_argument("--token", default=None,
                   help="the token clients must give (default: none on loopback, a new random "
                        "one, printed, beyond loopback)")
    d = Limits()
    s.add_argument("--max_request_mb", type=at_least(1), default=d.request_bytes // MiB)
    s.add_argument("--max_files", type=at_least(1), default=d.files_per_job,
                   help="images per job (default %(default)s)")
    s.add_argument("--max_pixels", type=at_least(1), default=d.pixels_per_image,
                   help="width x height per image (default %(default)s)")
    s.add_argument("--max_disk_mb", type=at_least(1), default=d.disk_bytes // MiB,
                   help="uploads kept for all jobs (default %(default)s)")
    s.add_argument("--max_memory_mb", type=at_least(1), default=d.memory_bytes // MiB,
                   help="maps kept for all jobs (default %(default)s)")
    s.add_argument("--max_output_side", type=at_least(16), default=d.output_side,
                   help="longest side of an image, overlay or mask served (default %(default)s)")
    c = ConnectionLimits()
    s.add_argument("--header_timeout", type=positive, default=c.header_seconds, metavar="S",
                   help="seconds a client has to send a request's line and headers; then the "
                        "connection is closed (default %(default)s)")
    s.add_argument("--min_body_rate", type=positive, default=c.body_rate / 1024, metavar="KIB_S",
                   help="KiB a second a request's body must average after --header_timeout "
                        "seconds; slower: 408 and closed (default %(default)s)")
    s.add_argument("--max_connections", type=at_least(1), default=c.connections,
                   help="connections open at once, at most half the open-file limit; past it the "
                        "one waiting longest for its request is closed, or the new one gets 503 "
                        "(default %(default)s)")
    p.set_defaults(num_workers=0)  # the images load in the worker thread, no processes
    add_scoring_flags(p, references="paths")  # as predict.py (an upload is a folder)
    add_onnx_flag(p)
    add_tile_flags(p)  # the jobs' default; a job may set its own (Service.submit's tile)
    add_model_flags(p)
    add_profile_flags(p)
    return p.parse_args(argv)


def add_profile_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("product profiles (docs/app.md)")
    g.add_argument("--profiles_dir", default="./results/app/profiles", metavar="DIR",
                   help="where the product profiles are kept across restarts (default "
                        "%(default)s, relative to the working directory)")
    d = ProfileLimits()
    g.add_argument("--max_profiles", type=at_least(1), default=d.profiles,
                   help="profiles kept (default %(default)s)")
    g.add_argument("--max_profile_references", type=at_least(1), default=d.references,
                   help="reference images of one profile (default %(default)s)")
    g.add_argument("--max_profiles_mb", type=at_least(1), default=d.disk_bytes // MiB,
                   help="disk taken by every profile's images and cached reference memory "
                        "(default %(default)s)")


def profiles_of(args: argparse.Namespace) -> Profiles:
    """The profiles under --profiles_dir (what a killed run left there is cleaned first)."""
    check_output_folder(args.profiles_dir, "--profiles_dir")
    return Profiles(args.profiles_dir, ProfileLimits(
        profiles=args.max_profiles, references=args.max_profile_references,
        disk_bytes=args.max_profiles_mb * MiB))


def connection_limits_of(args: argparse.Namespace) -> ConnectionLimits:
    return ConnectionLimits(header_seconds=args.header_timeout,
                            body_rate=args.min_body_rate * 1024, connections=args.max_connections)


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(request_bytes=args.max_request_mb * MiB, files_per_job=args.max_files,
                  pixels_per_image=args.max_pixels, disk_bytes=args.max_disk_mb * MiB,
                  memory_bytes=args.max_memory_mb * MiB, output_side=args.max_output_side)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_of(args: argparse.Namespace) -> Access:
    """The token (a new one beyond loopback when none is given) and the allowed host names."""
    token = args.token or (None if is_loopback(args.host) else secrets.token_urlsafe(24))
    hosts = list(args.allowed_host)
    if not is_loopback(args.host) and args.host not in ("0.0.0.0", "::"):
        hosts.append(args.host)
    return Access(token, hosts)


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (port 0: any free one); a taken port is a usage error."""
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") \
            from None
    return sock


def announce(args: argparse.Namespace, access: Access, port: int) -> None:
    """Where the page is, with its token; a loud warning when it is reachable from outside."""
    shown = args.host if is_loopback(args.host) else (args.allowed_host or [args.host])[0]
    query = f"/?token={access.token}" if access.token else ""
    print(f"serving the inspection page on http://{shown}:{port}{query} (Ctrl-C stops it)",
          flush=True)
    if not is_loopback(args.host):
        names = ", ".join(access.hosts) or "none: add --allowed_host NAME"
        print(f"WARNING: listening on {args.host}, beyond this machine: anyone who can reach "
              f"port {port} and has the token can run the model on their images. Host names "
              f"allowed besides loopback: {names}.", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    raise_open_file_limit()  # before the model's files and any connection
    try:
        sock = listen(args.host, args.port)  # a taken port fails before the model loads
        profiles = profiles_of(args)
        predictor = predictor_of(args)
        service = Service(predictor, limits_of(args), args.allow_folder, args.threshold,
                          description(args, predictor.strategy.name), profiles,
                          strategy_options(args))
    except INPUT_ERRORS as e:
        return fail(e)
    access = access_of(args)
    announce(args, access, sock.getsockname()[1])
    config = uvicorn.Config(create_app(service, access), log_level="warning",
                            timeout_graceful_shutdown=5,
                            http=protocol_for(connection_limits_of(args)))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def description(args: argparse.Namespace, name: str) -> str:
    """What the page shows of the model: its file by name only (no path of the server's)."""
    scoring = (f", {args.fusion} fusion with {len(args.reference)} reference input(s)"
               if args.reference else f", {name} scoring" if name != "zero_shot" else ", zero-shot")
    source = f"ONNX {Path(args.onnx).name}" if args.onnx else \
        f"checkpoint {Path(args.checkpoint_path).name}"
    tiles = f", tiles of {args.tile} px" if args.tile else ""
    return f"{source}{scoring}{tiles}"


if __name__ == "__main__":
    sys.exit(main())
