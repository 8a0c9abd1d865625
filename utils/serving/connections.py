"""Connections that cannot starve the server: a deadline for receiving each whole request, a cap
on open connections, and the open-file limit raised to what the system allows.

    raise_open_file_limit()
    uvicorn.Config(app, http=protocol_for(ConnectionLimits(header_seconds=10)))

uvicorn has no deadline for receiving a request: a client that sends half a request and waits
holds its connection, and a file descriptor, for as long as it likes, until the process runs out
of them and ``GET /`` is no longer accepted. uvicorn's ``limit_concurrency`` does count such
connections, but it refuses only a connection that has sent a whole request (with a 503), so the
half-sent ones are never refused and they block the rest. ``Deadlined`` (uvicorn's h11
protocol) therefore watches what each connection is receiving:

- its request line and headers, within ``header_seconds`` of the moment the server starts waiting
  for them (the connection opened, or its previous answer sent); late: the connection is closed;
- its body at ``body_rate`` bytes a second on average after that same grace (a body that the
  server has stopped reading, because the app is not reading it yet, is not held against the
  client); late: a 408 where no answer was started, and closed;
- past ``connections`` open at once, the connection that has waited longest for its request's
  headers is closed to make room (an idle keep-alive one, or a half-sent one), so that a whole
  request, such as a browser's ``GET /``, still gets in; where every connection is busy with a
  whole request, the new one is answered 503 and closed.
"""
from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["ConnectionLimits", "Deadlined", "protocol_for", "raise_open_file_limit",
           "log_loop_errors"]

log = logging.getLogger("vcp.connections")


@dataclass(frozen=True)
class ConnectionLimits:
    """What each connection must send, and how many may be open at once."""

    header_seconds: float = 10.0  # the request line and headers
    body_rate: float = 16 * 1024  # bytes a second a body must average, after header_seconds
    connections: int = 1000  # open at once (at most half the open-file limit)


def _raw(status: str, message: str) -> bytes:
    """A whole HTTP answer ``{"error": message}`` that closes the connection."""
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


TOO_SLOW = _raw("408 Request Timeout", "the request's body came too slowly; send it again")


class Deadlined(H11Protocol):
    """uvicorn's h11 protocol with a deadline for receiving each request and a cap on open
    connections (``protocol_for`` sets ``limits`` and ``cap``)."""

    limits = ConnectionLimits()
    cap = ConnectionLimits.connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.phase: str | None = None  # "head", "body", or None: a whole request received
        self.since, self.body_bytes, self.timer = 0.0, 0, None
        if not self._room():
            transport.write(_raw("503 Service Unavailable", f"the server has its limit of "
                                 f"{self.cap} connections open; try again shortly"))
            transport.close()
            return
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.phase == "body":
            self.body_bytes += len(data)
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        super().connection_lost(exc)

    def _room(self) -> bool:
        """Room for this connection: under the cap, or made by closing the connection that has
        waited longest for its request's headers; False when every other one is busy."""
        open_ = [c for c in self.connections if not c.transport.is_closing()]
        if len(open_) <= self.cap:
            return True
        waiting = [c for c in open_ if c is not self and c.phase == "head"]
        if not waiting:
            return False
        min(waiting, key=lambda c: c.since).transport.close()
        return True

    def _watch(self) -> None:
        """Follow what the connection is receiving (a new phase starts its clock) and keep a
        timer while it receives a request."""
        if self.transport.is_closing():
            return
        phase = {h11.IDLE: "head", h11.SEND_BODY: "body"}.get(self.conn.their_state)
        if phase != self.phase:
            self.phase, self.since, self.body_bytes = phase, self.loop.time(), 0
        if phase is not None and self.timer is None:
            self.timer = self.loop.call_at(self._deadline(), self._expire)

    def _deadline(self) -> float:
        grace = self.since + self.limits.header_seconds
        return grace if self.phase == "head" else grace + self.body_bytes / self.limits.body_rate

    def _expire(self) -> None:
        """The timer: drop the connection when it is late, else wait for its new deadline."""
        self.timer = None
        self._watch()
        now = self.loop.time()
        if self.phase is None or self.transport.is_closing():
            return
        if self.flow.read_paused:  # the server is not reading: the client cannot be late
            self.since, self.body_bytes = now, 0
        elif now >= self._deadline():
            if self.phase == "body" and self.conn.our_state is h11.SEND_RESPONSE:
                self.transport.write(TOO_SLOW)
            self.transport.close()
            return
        self.timer = self.loop.call_at(self._deadline(), self._expire)


def protocol_for(limits: ConnectionLimits) -> type[Deadlined]:
    """``Deadlined`` with these limits, its cap at most half the open-file limit (the other
    half: the model's files, uploads spooled to disk, the listening socket)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = limits.connections if soft == resource.RLIM_INFINITY else \
        max(1, min(limits.connections, soft // 2))
    return type("Deadlined", (Deadlined,), {"limits": limits, "cap": cap})


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to the most the system allows it; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # a system that caps it below "unlimited" (macOS)
        return soft
    return hard


def log_loop_errors(loop, context: dict) -> None:
    """The event loop's errors (``accept()`` out of file descriptors, say) as one log line,
    without a traceback (``loop.set_exception_handler``)."""
    error = context.get("exception")
    why = "" if error is None else f" ({type(error).__name__}" + (
        f": {error.strerror})" if getattr(error, "strerror", None) else ")")
    log.warning("%s%s", context.get("message", "event loop error"), why)
