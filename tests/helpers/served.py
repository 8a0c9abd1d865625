"""``app.py`` in a subprocess on a free port of 127.0.0.1 (the tests of the service and its load
benchmark): started, stopped with SIGTERM or killed with SIGKILL."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

__all__ = ["Served"]

ROOT = Path(__file__).resolve().parents[2]


class Served:
    """``app.py --port 0 flags`` with its temporary files in ``tmp`` (``TMPDIR``) and its
    stderr in ``log`` (a file open for writing; default: dropped); ``url`` once it listens."""

    def __init__(self, flags: list[str], tmp: Path, log=subprocess.DEVNULL):
        tmp.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / "app.py"), "--port", "0", *flags], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=log, text=True,
            env={**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"})
        line = self.process.stdout.readline()
        found = re.search(r"http://[^ /]+:\d+", line)
        if found is None:
            self.process.kill()
            raise RuntimeError(f"app.py did not start (exit status {self.process.wait()})")
        self.url = found.group(0)

    def peak_rss(self) -> int:
        """The server's peak resident memory so far, bytes (Linux's VmHWM)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self) -> int:
        """SIGTERM, and its exit status once it has stopped."""
        self.process.terminate()
        return self.process.wait(30)

    def kill(self) -> None:
        """SIGKILL: nothing is cleaned."""
        self.process.kill()
        self.process.wait(30)
