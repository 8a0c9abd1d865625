"""A small HTTP client for the inspection service's tests and its load benchmark: one cookie jar
per client (the server scopes jobs to it), multipart forms with any file names, any headers."""
from __future__ import annotations

import http.cookiejar
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["multipart", "Client"]

BOUNDARY = "----vcp-test-boundary-7f3a"


def multipart(form: list[tuple[str, object]]) -> tuple[bytes, str]:
    """(body, content type) of ``form``: [(field, value)], a value being a str, a Path (sent as
    a file under its name) or (file name as str or bytes, content bytes)."""
    parts = []
    for name, value in form:
        if isinstance(value, Path):
            value = (value.name, value.read_bytes())
        if isinstance(value, tuple):
            filename, body = value
            filename = filename.encode() if isinstance(filename, str) else filename
            head = (f'Content-Disposition: form-data; name="{name}"; filename="'.encode()
                    + filename + b'"\r\nContent-Type: application/octet-stream')
        else:
            head, body = f'Content-Disposition: form-data; name="{name}"'.encode(), value.encode()
        parts.append(f"--{BOUNDARY}\r\n".encode() + head + b"\r\n\r\n" + body + b"\r\n")
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode(), \
        f"multipart/form-data; boundary={BOUNDARY}"


class Client:
    """One client of a server at ``url``: its own cookies, optionally a token."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 120):
        self.url, self.token, self.timeout = url.rstrip("/"), token, timeout
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def request(self, path: str, form=None, method: str | None = None, headers=None,
                data: bytes | None = None) -> tuple[int, bytes]:
        """(status, body) of a request; ``form`` is sent as multipart."""
        headers = dict(headers or {})
        if self.token and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.token}"
        if form is not None:
            data, headers["Content-Type"] = multipart(form)
        req = urllib.request.Request(self.url + path, data, headers, method=method)
        try:
            with self.opener.open(req, timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def json(self, path: str, **kwargs) -> tuple[int, dict]:
        status, body = self.request(path, **kwargs)
        return status, json.loads(body)

    def run_job(self, form, timeout: float = 120, poll: float = 0.02) -> dict:
        """Post a job and poll it (incrementally, as the page does) until it is over."""
        status, body = self.json("/api/jobs", form=form)
        assert status == 200, body
        job, results, skipped = body["job"], [], []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, s = self.json(f"/api/jobs/{job}?since={len(results)}"
                                  f"&skipped_since={len(skipped)}")
            assert status == 200, s
            results += s["results"]
            skipped += s["skipped"]
            if s["finished"]:
                return {**s, "id": job, "results": results, "skipped": skipped}
            time.sleep(poll)
        raise TimeoutError(job)
