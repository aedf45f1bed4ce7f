"""The service's calls over a Unix socket, for a client on the shard's machine.

A gRPC call costs about half a millisecond in Python (its HTTP/2 framing, completion queues and thread
hand-offs), whatever it carries; a round trip over a Unix socket costs a few tens of microseconds. A client
that attached a shared buffer (so it runs on the shard's machine, see :mod:`shared_memory`) is told the name
of the shard's socket in the ``AttachBuffer`` answer, and sends the same messages there, framed as below; the
shard runs them through the same handlers, checks and error codes as over gRPC.

- The socket is in Linux's abstract namespace (no file); a connection from a process of another user is
  closed at once (the peer's credentials, ``SO_PEERCRED``).
- Frames: a little-endian ``uint32`` byte count, then the body.
- The first frame a client sends is its token (empty without one); the shard answers an empty response
  (status 0) or ``UNAUTHENTICATED`` and closes.
- A request's body: ``uint32`` deadline in milliseconds from now, ``uint8`` length of the method's name, the
  name (``PullRows``, ...), the request message. The answer's body: ``uint8`` gRPC status code, then the
  response message (status 0) or the error's details in UTF-8.
- One call at a time a connection; a client opens as many connections as it has calls in flight.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger("megaclass.paramserver")

# gRPC's status codes by name (the numbers every gRPC implementation uses)
STATUS_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
_CODE_NAMES = {number: name for name, number in STATUS_CODES.items()}
_LENGTH = struct.Struct("<I")
_REQUEST = struct.Struct("<IB")  # deadline in ms, the method name's length
_MAX_DEADLINE_MS = 2**32 - 1
_MAX_FRAME_BYTES = 2**32 - 1
_HELLO_BYTES = 4096  # a token longer than this is refused unread

# a request's handler: (body, seconds left) -> (status code name, response bytes or UTF-8 details)
Handler = Callable[[memoryview, float | None], tuple[str, bytes]]


def available() -> bool:
    """Whether this platform has Unix sockets in an abstract namespace (Linux)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SO_PEERCRED")


class LocalCallError(Exception):
    """A call over the local socket that failed: its gRPC status (``code()``, ``details()``, as
    ``grpc.RpcError`` gives them)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self._code, self._details = code, details

    def code(self) -> Any:
        import grpc

        return grpc.StatusCode[self._code]

    def details(self) -> str:
        return self._details


def _send(sock: socket.socket, parts: Sequence[bytes | memoryview]) -> None:
    """One frame of ``parts`` (no copy of a large part)."""
    views = [memoryview(part).cast("B") for part in parts]
    views.insert(0, memoryview(_LENGTH.pack(sum(view.nbytes for view in views))))
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def _answer(sock: socket.socket, code: str, payload: bytes) -> None:
    """An answer's frame: status ``code`` (a gRPC code's name), then ``payload``."""
    _send(sock, [bytes([STATUS_CODES[code]]), payload])


def _receive_exactly(sock: socket.socket, count: int) -> bytearray:
    data = bytearray(count)
    view, got = memoryview(data), 0
    while got < count:
        more = sock.recv_into(view[got:])
        if not more:
            raise ConnectionResetError("the other end closed the connection")
        got += more
    return data


def _skip(sock: socket.socket, count: int) -> None:
    """Read ``count`` bytes and drop them, a piece at a time."""
    piece = bytearray(min(count, 1 << 20))
    while count:
        got = sock.recv_into(piece, min(count, len(piece)))
        if not got:
            raise ConnectionResetError("the other end closed the connection mid-frame")
        count -= got


class _TooLarge(Exception):
    """A frame over the reader's limit (left unread)."""


def _receive(sock: socket.socket, max_bytes: int) -> bytearray | None:
    """The next frame's body; None when the other end closed between frames.

    Raises:
        _TooLarge: the frame is over ``max_bytes``.
    """
    head = sock.recv(_LENGTH.size, socket.MSG_WAITALL)
    if not head:
        return None
    if len(head) < _LENGTH.size:
        raise ConnectionResetError("the other end closed the connection mid-frame")
    (count,) = _LENGTH.unpack(head)
    if count > max_bytes:
        raise _TooLarge(count)
    return _receive_exactly(sock, count)


class LocalListener:
    """A shard's socket: a thread accepts connections, a thread a connection runs its calls in turn.

    Args:
        handlers: by method name (``PullRows``, ...), the function answering a request's bytes.
        token: the shard's token, which a connection's first frame must hold (None: no token).
        max_bytes: the largest request read; a larger one is answered ``RESOURCE_EXHAUSTED`` and its
            connection closed.
        max_connections: connections served at once; more are refused (``RESOURCE_EXHAUSTED``) and the
            client makes its call over gRPC.
    """

    def __init__(
        self, handlers: dict[str, Handler], *, token: str | None, max_bytes: int, max_connections: int
    ) -> None:
        self.name = f"megaclass-ps-{os.getpid()}-{secrets.token_hex(8)}"
        self._handlers, self._max_bytes, self._max_connections = handlers, max_bytes, max_connections
        self._token = b"" if token is None else token.encode()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name="ps-local-accept", daemon=True).start()

    def close(self) -> None:
        """Stop accepting and close every connection (calls running finish; their answers are dropped)."""
        with self._lock:
            self._closed = True
            connections, self._open = list(self._open), set()
        for sock in (self._sock, *connections):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                refused = len(self._open) >= self._max_connections
                if not refused:
                    self._open.add(sock)
            if refused:
                self._refuse(sock, "RESOURCE_EXHAUSTED", f"{self._max_connections} local connections open")
                continue
            threading.Thread(target=self._serve, args=(sock,), name="ps-local", daemon=True).start()

    def _refuse(self, sock: socket.socket, code: str, details: str) -> None:
        try:
            sock.settimeout(1.0)
            _answer(sock, code, details.encode())
        except OSError:
            pass
        sock.close()

    def _serve(self, sock: socket.socket) -> None:
        try:
            if self._welcome(sock):
                while self._call(sock):
                    pass
        except OSError:
            pass  # the client went away (or the shard is stopping)
        finally:
            with self._lock:
                self._open.discard(sock)
            sock.close()

    def _welcome(self, sock: socket.socket) -> bool:
        """Check the peer's user and its token (the first frame); answer either way."""
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():
            return False  # another user's process: closed without a word
        sock.settimeout(5.0)  # a client that connects and says nothing does not hold a thread for ever
        try:
            hello = _receive(sock, _HELLO_BYTES)
        except _TooLarge:
            hello = None
        sock.settimeout(None)
        if hello is None or not hmac.compare_digest(bytes(hello), self._token):
            _answer(sock, "UNAUTHENTICATED", b"missing or wrong token")
            return False
        _answer(sock, "OK", b"")
        return True

    def _call(self, sock: socket.socket) -> bool:
        """Run one call; False when the connection is done."""
        try:
            body = _receive(sock, self._max_bytes)
        except _TooLarge as error:  # read past in pieces, never held: the connection stays in step
            _skip(sock, error.args[0])
            details = f"a request of {error.args[0]} bytes, over the {self._max_bytes} this shard reads"
            _answer(sock, "RESOURCE_EXHAUSTED", details.encode())
            return True
        if body is None:
            return False
        received = time.monotonic()
        if len(body) < _REQUEST.size:
            raise ConnectionResetError("a request frame without its header")
        deadline_ms, name_length = _REQUEST.unpack_from(body)
        start = _REQUEST.size + name_length
        method = bytes(body[_REQUEST.size : start]).decode("ascii", "replace")
        handler = self._handlers.get(method)
        if handler is None:
            code, payload = "UNIMPLEMENTED", f"no method {method!r}".encode()
        else:
            time_left = deadline_ms / 1000 - (time.monotonic() - received)
            code, payload = handler(memoryview(body)[start:], time_left)
        _answer(sock, code, payload)
        return True


class LocalChannel:
    """A client's connections to one shard's socket; :meth:`call` starts a call on an idle one."""

    def __init__(self, name: str, token: str | None, *, connect_timeout_s: float) -> None:
        self.name = name
        self._token = b"" if token is None else token.encode()
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()

    def call(
        self, method: str, request: bytes, *, timeout: float, parse: Callable[[memoryview], Any]
    ) -> LocalCall | None:
        """Send ``request`` to ``method``; the call, whose :meth:`LocalCall.result` waits for the answer.
        None where no connection could be made (the shard is gone, or full): the caller uses gRPC."""
        name = method.encode("ascii")
        if len(request) + _REQUEST.size + len(name) > _MAX_FRAME_BYTES:
            return None  # no frame holds it (gRPC names the shard's limit)
        deadline = time.monotonic() + timeout
        header = _REQUEST.pack(min(int(timeout * 1000), _MAX_DEADLINE_MS), len(name))
        for _ in range(2):  # an idle connection may have lost its shard (restarted): then one new one
            sock, fresh = self._connection()
            if sock is None:
                return None
            try:
                sock.settimeout(timeout)
                _send(sock, [header, name, request])
                return LocalCall(self, sock, deadline, parse)
            except OSError:
                sock.close()
                self.close()  # the other idle ones went with it
                if fresh:
                    return None
        return None

    def close(self) -> None:
        """Close the idle connections (a later call opens a new one)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def _connection(self) -> tuple[socket.socket | None, bool]:
        """An idle connection, else a new one (then True); None where none could be made."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), False
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._connect_timeout_s)
            sock.connect("\0" + self.name)
            _send(sock, [self._token])
            answer = _receive(sock, _HELLO_BYTES)
            if not answer or answer[0] != STATUS_CODES["OK"]:
                sock.close()
                return None, True
        except (OSError, _TooLarge):
            sock.close()
            return None, True
        return sock, True

    def _done(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.append(sock)


class LocalCall:
    """A call in flight over a :class:`LocalChannel`, used as a future (:meth:`result`,
    :meth:`add_done_callback`)."""

    def __init__(
        self, channel: LocalChannel, sock: socket.socket, deadline: float, parse: Callable[[memoryview], Any]
    ) -> None:
        self._channel, self._sock, self._deadline, self._parse = channel, sock, deadline, parse
        self._answer: Any = None
        self._error: LocalCallError | None = None
        self._finished = False

    def result(self) -> Any:
        """The response message; raises :class:`LocalCallError` with the shard's status."""
        if not self._finished:
            self._finish()
        if self._error is not None:
            raise self._error
        return self._answer

    def add_done_callback(self, callback: Callable[[LocalCall], None]) -> None:
        """Run ``callback(self)`` once the answer is in (waiting for it now if it is not)."""
        if not self._finished:
            self._finish()
        callback(self)

    def _finish(self) -> None:
        self._finished = True
        sock = self._sock
        try:
            sock.settimeout(max(self._deadline - time.monotonic(), 1e-3))
            body = _receive(sock, 2**63)
        except TimeoutError:
            sock.close()  # an answer may still come: the connection is not reused
            self._error = LocalCallError("DEADLINE_EXCEEDED", "no answer within the call's deadline")
            return
        except OSError as error:
            sock.close()
            self._channel.close()  # the idle connections are most likely gone with the shard
            self._error = LocalCallError("UNAVAILABLE", f"the shard's local socket: {error}")
            return
        if not body:
            sock.close()
            self._channel.close()
            self._error = LocalCallError("UNAVAILABLE", "the shard closed its local socket")
            return
        self._channel._done(sock)
        code = _CODE_NAMES.get(body[0], "UNKNOWN")
        if code != "OK":
            self._error = LocalCallError(code, bytes(body[1:]).decode("utf-8", "replace"))
            return
        self._answer = self._parse(memoryview(body)[1:])  # no copy: a view into the received bytes
