"""Slow clients against a running ``app.py`` (utils/serving/connections.py): under a low open-file
limit, half-sent requests are dropped by their deadline, more of them than the server has open
files do not stop ``GET /`` from answering at once, and nothing in the log is a traceback."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.http_client import Client
from utils.serving.connections import log_loop_errors

ROOT = Path(__file__).resolve().parents[1]
HEADER_SECONDS, SLACK = 1.5, 1.5
OPEN_FILES = (256, 512)  # the server's soft and hard limit at start
CAP = OPEN_FILES[1] // 2  # connections: half the open files, once raised to the hard limit
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n"  # no blank line: unfinished
HALF_BODY = (b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
             b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")  # 20 of 100000 bytes


def low_open_files():
    resource.setrlimit(resource.RLIMIT_NOFILE, OPEN_FILES)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_archive, tiny_checkpoint):
    """``app.py`` (tiny model) started under an open-file limit of 256 (at most 512), with a
    1.5 s header deadline and a body rate of 1 KiB/s; (url, process, log file)."""
    box = tmp_path_factory.mktemp("slow")
    log = open(box / "server.log", "w+")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--checkpoint_path", str(tiny_checkpoint),
         "--pretrained_path", str(tiny_archive), "--device", "cpu", "--port", "0",
         "--header_timeout", str(HEADER_SECONDS), "--min_body_rate", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, preexec_fn=low_open_files,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = re.search(r"http://[^ /]+:\d+", process.stdout.readline()).group(0)
    yield url, process, log
    process.terminate()
    process.wait(10)


def half_sent(url: str, data: bytes) -> socket.socket:
    host, port = url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(data)
    return sock


def closed_at(socks: list[socket.socket], until: float) -> tuple[list[float | None], list[bytes]]:
    """When the server closed each socket (EOF or reset; None: still open at ``until``), and what
    it answered before."""
    when, answers = [None] * len(socks), [b""] * len(socks)
    with selectors.DefaultSelector() as sel:
        for k, s in enumerate(socks):
            sel.register(s, selectors.EVENT_READ, k)
        while len(sel.get_map()) and time.monotonic() < until:
            for key, _ in sel.select(timeout=max(0.0, until - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                answers[key.data] += data
                if not data:
                    when[key.data] = time.monotonic()
                    sel.unregister(key.fileobj)
    for s in socks:
        s.close()
    return when, answers


def page_answers_at_once(url: str) -> None:
    start = time.monotonic()
    assert Client(url, timeout=5).request("/")[0] == 200
    assert time.monotonic() - start < 1.0


def test_the_open_file_limit_is_raised_at_start(server):
    url, process, _ = server
    limits = Path(f"/proc/{process.pid}/limits").read_text()
    assert re.search(r"Max open files\s+512\s+512\s", limits), limits


def test_half_sent_requests_are_dropped_by_their_deadline(server):
    url, _, _ = server
    start = time.monotonic()
    socks = [half_sent(url, HALF_HEAD) for _ in range(20)] + \
        [half_sent(url, HALF_BODY) for _ in range(10)]
    page_answers_at_once(url)
    when, answers = closed_at(socks, start + HEADER_SECONDS + SLACK + 1)
    assert None not in when, "a half-sent request was never dropped"
    waited = [t - start for t in when]
    # held until the deadline (the body's: 1.5 s, then 1 KiB/s for its 20 bytes), not much later
    assert min(waited) > 0.8 * HEADER_SECONDS and max(waited) < HEADER_SECONDS + SLACK, waited
    assert all(a == b"" for a in answers[:20])  # no request yet: closed without an answer
    for a in answers[20:]:  # a request waiting for its body: 408 with a line, then closed
        assert a.startswith(b"HTTP/1.1 408 ") and b'"error": "the request\'s body came too ' \
            b'slowly' in a, a


def test_past_the_cap_of_busy_connections_a_clean_503(server):
    """Connections busy with a request (receiving its body) are not closed for room: past the
    cap a new one is answered 503 with a line and closed; once they are dropped, the page
    answers again."""
    url, _, _ = server
    start = time.monotonic()
    busy = [half_sent(url, HALF_BODY) for _ in range(CAP)]
    time.sleep(0.5)
    when, answers = closed_at([half_sent(url, b"")], start + HEADER_SECONDS)
    assert when[0] is not None and answers[0].startswith(b"HTTP/1.1 503 "), answers
    assert f"limit of {CAP} connections open".encode() in answers[0]
    when, _ = closed_at(busy, start + HEADER_SECONDS + SLACK + 1)
    assert None not in when
    page_answers_at_once(url)


def test_more_half_sent_requests_than_open_files(server):
    """600 half-sent connections, more than the server's 512 open files: the page answers at
    once throughout (the connection that waited longest for its request makes room), each is
    dropped within the deadline, and the log holds no traceback."""
    url, _, log = server
    flood, opened = [], []
    for k in range(600):
        flood.append(half_sent(url, HALF_HEAD))
        opened.append(time.monotonic())
        if k % 100 == 99:
            page_answers_at_once(url)
    when, _ = closed_at(flood, time.monotonic() + HEADER_SECONDS + SLACK + 1)
    assert None not in when
    assert max(t - o for t, o in zip(when, opened)) < HEADER_SECONDS + SLACK
    page_answers_at_once(url)
    log.flush()
    text = Path(log.name).read_text()
    assert "Traceback" not in text and "Too many open files" not in text, text[-2000:]


def test_the_event_loop_errors_are_one_line(caplog):
    """accept() out of file descriptors, as asyncio reports it: one line, no traceback."""
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(log_loop_errors)
        with caplog.at_level(logging.WARNING):
            loop.call_exception_handler({
                "message": "socket.accept() out of system resource",
                "exception": OSError(24, "Too many open files"), "socket": None})
    finally:
        loop.close()
    assert [r.getMessage() for r in caplog.records] == [
        "socket.accept() out of system resource (OSError: Too many open files)"]
    assert all(r.exc_info is None for r in caplog.records)
