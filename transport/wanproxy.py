"""A WAN emulator: a TCP proxy that adds delay, jitter, a bandwidth cap, loss
and partitions between two peers on loopback.

This machine has no netem, so integration tests, benchmarks and
disaster-recovery drills put a :class:`WanProxy` between two gmd daemons
instead. Every accepted connection is connected onwards to one *target*; bytes
are pumped both ways, each direction on its own:

* **delay** (seconds, one way) is added to every chunk read from a socket.
* **jitter** adds a uniform random ``0..jitter`` seconds per chunk. It never
  reorders bytes: a chunk's delivery time is
  ``max(previous delivery time in this direction, now + delay + U(0, jitter))``.
* **bandwidth** (bytes/s, per direction per connection, 0 = unlimited) is a
  token bucket whose burst is :func:`bucket_burst` bytes (20 ms of traffic,
  at least 4 KiB).
* **drop** is the probability per forwarded chunk that, instead of forwarding
  it, the proxy resets the connection (TCP does not lose bytes; a lossy path
  ends in a reset). Both peers see a reset (``SO_LINGER`` 0).
* **seed** makes jitter and drop reproducible.

Settings change at run time with :meth:`WanProxy.update` and apply to chunks
read from then on. :meth:`WanProxy.partition` cuts the path:

* ``"blackhole"``: nothing is delivered either way and nothing more is read
  (bytes already read are *held*, not lost, like TCP during a real partition);
  new connections are accepted but not connected onwards. :meth:`~WanProxy.heal`
  lets the held bytes flow again, in order.
* ``"reset"``: every open connection is aborted at once and new connections
  are accepted and reset, until :meth:`~WanProxy.heal`.

Memory is bounded: each direction of each connection holds at most
``buffer_limit`` bytes (default :data:`DEFAULT_BUFFER_LIMIT`, 16 MiB) between
reading and delivering; when that is full the proxy stops reading, and TCP
back-pressure stalls the sender. An end-of-file (a peer's ``shutdown(SHUT_WR)``)
is forwarded after the bytes before it; when both directions have ended, both
sockets are closed. A reset from one peer is passed on as a reset to the
other. If the target cannot be reached, the client connection is reset.

Concurrency rules: all methods are called from the trio thread that runs
:meth:`WanProxy.serve`; :meth:`~WanProxy.update`, :meth:`~WanProxy.partition`,
:meth:`~WanProxy.heal` and :meth:`~WanProxy.reset_all` are synchronous and take
effect before they return (a reset's sockets are closed by then). All timing
uses ``trio.current_time()``, so trio's ``MockClock`` works.

Process mode, for multi-process tests and drills::

    python -m transport.wanproxy --listen 127.0.0.1:0 --target 127.0.0.1:7801 \\
        [--delay 0.02] [--jitter 0.005] [--bandwidth 10000000] [--drop 0.0] \\
        [--seed N] [--control PATH] [--debug]

It prints exactly one line ``listening HOST:PORT`` to stdout once it accepts
connections (callers wait for that line; they never sleep). ``--control PATH``
opens a Unix socket (mode 0600) taking newline-delimited JSON requests, one
JSON reply line each:

* ``{"op": "set", "delay": 0.02, ...}`` -> ``{"ok": true, "settings": {...}}``
* ``{"op": "partition", "mode": "blackhole"}`` (or ``"reset"``) -> ``{"ok": true, "partitioned": MODE}``
* ``{"op": "heal"}`` -> ``{"ok": true, "partitioned": null}``
* ``{"op": "reset"}`` -> ``{"ok": true, "reset": N}``
* ``{"op": "stats"}`` -> ``{"ok": true, "stats": {...}}``

A bad request is answered ``{"ok": false, "error": "..."}`` naming what was
wrong; it never stops the proxy. :func:`control_request` is a blocking client
for it. SIGTERM or SIGINT closes the listener and every connection and exits
0; bad arguments exit 2, a failure to start exits 1.

Never imports ``gmd``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import signal
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any

import trio

from . import jsonlines

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "PARTITION_MODES",
    "ProxyStatistics",
    "WanProxy",
    "WanSettings",
    "apply_control_request",
    "bucket_burst",
    "control_request",
    "main",
]

log = logging.getLogger(__name__)

#: Bytes each direction of each connection may hold between reading and delivering.
DEFAULT_BUFFER_LIMIT = 16 << 20
#: The largest single read from a socket.
MAX_CHUNK = 64 << 10
#: What :meth:`WanProxy.partition` accepts.
PARTITION_MODES = ("blackhole", "reset")
#: The longest control request line accepted.
MAX_CONTROL_LINE = 64 << 10
#: The longest control reply :func:`control_request` accepts.
MAX_REPLY = 1 << 20

_LINGER_ZERO = struct.pack("ii", 1, 0)


@dataclass
class WanSettings:
    """What the emulated path does to the bytes it carries.

    ``delay`` and ``jitter`` are seconds, ``bandwidth`` bytes per second per
    direction per connection (0 = unlimited), ``drop`` a probability per
    forwarded chunk that the connection is reset instead; ``seed`` makes jitter
    and drop reproducible.
    """

    delay: float = 0.0
    jitter: float = 0.0
    bandwidth: int = 0
    drop: float = 0.0
    seed: int | None = None

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range."""
        for field in dataclasses.fields(self):
            _check_setting(field.name, getattr(self, field.name))


@dataclass(frozen=True)
class ProxyStatistics:
    """A snapshot of a :class:`WanProxy`.

    ``resets`` counts connections the proxy aborted (drop, reset partition,
    :meth:`WanProxy.reset_all`, or a reset passed on from a peer); ``refused``
    counts connections reset on arrival during a ``"reset"`` partition;
    ``connect_failures`` counts clients whose target could not be reached.
    ``bytes_queued`` is what every direction of every connection holds now and
    ``peak_bytes_queued`` the most one direction has ever held (never above
    ``buffer_limit``).
    """

    connections_total: int
    connections_open: int
    bytes_to_target: int
    bytes_to_client: int
    resets: int
    refused: int
    connect_failures: int
    bytes_queued: int
    peak_bytes_queued: int
    buffer_limit: int
    partitioned: str | None


def _check_setting(name: str, value: Any) -> None:
    """Raise ``ValueError``/``TypeError`` unless ``value`` fits setting ``name``."""
    if name not in _SETTING_NAMES:
        raise ValueError(f"unknown setting {name!r} (known: {', '.join(_SETTING_NAMES)})")
    if name == "seed":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"seed must be an integer or null, not {value!r}")
        return
    if name == "bandwidth":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"bandwidth must be an integer number of bytes/s, not {value!r}")
        if value < 0:
            raise ValueError(f"bandwidth must be >= 0 (0 = unlimited), not {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value}")
    if name == "drop":
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"drop must be between 0 and 1, not {value}")
    elif value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, not {value}")


_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(WanSettings))


def bucket_burst(bandwidth: int) -> int:
    """The token bucket's size at ``bandwidth`` bytes/s: 20 ms of traffic, at
    least 4 KiB. No more than this many bytes pass ahead of the rate."""
    return max(4096, bandwidth // 50)


def _reset_close(stream: trio.SocketStream | None) -> None:
    """Close ``stream``'s socket so that the peer sees a reset (RST)."""
    if stream is None:
        return
    sock = stream.socket
    if sock.fileno() != -1:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError:
            pass
    sock.close()


def _nodelay(stream: trio.SocketStream) -> None:
    try:
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
    except OSError:  # pragma: no cover - not TCP
        pass


class _Eof:
    """The queue marker for a peer's end-of-file."""

    def __len__(self) -> int:
        return 0


_EOF = _Eof()


class _Direction:
    """One direction of one connection: the held chunks, the delivery clock
    and the token bucket.

    Each entry is ``(deliver_at, chunk)``; a chunk counts against the byte
    budget from when it is read until it has been sent.
    """

    def __init__(self, proxy: WanProxy, name: str) -> None:
        self.proxy = proxy
        self.name = name
        self.chunks: deque[tuple[float, bytes | _Eof]] = deque()
        self.held = 0
        self.last_delivery = -math.inf
        self.tokens = 0.0
        self.tokens_at = trio.current_time()
        self.tokens_rate = -1
        self._lot = trio.lowlevel.ParkingLot()

    # --- queue ---------------------------------------------------------------

    async def wait_space(self) -> int:
        """Wait until the budget has room; return how many bytes fit."""
        limit = self.proxy.buffer_limit
        while self.held >= limit:
            await self._lot.park()
        return limit - self.held

    def put(self, chunk: bytes | _Eof) -> None:
        settings = self.proxy._settings
        now = trio.current_time()
        extra = self.proxy._rng.uniform(0.0, settings.jitter) if settings.jitter else 0.0
        deliver_at = max(self.last_delivery, now + settings.delay + extra)
        self.last_delivery = deliver_at
        self.chunks.append((deliver_at, chunk))
        self.held += len(chunk)
        self.proxy._bytes_queued += len(chunk)
        self.proxy._peak_bytes_queued = max(self.proxy._peak_bytes_queued, self.held)
        self._lot.unpark_all()

    async def peek(self) -> tuple[float, bytes | _Eof]:
        while not self.chunks:
            await self._lot.park()
        return self.chunks[0]

    def pop(self) -> None:
        _, chunk = self.chunks.popleft()
        self.held -= len(chunk)
        self.proxy._bytes_queued -= len(chunk)
        self._lot.unpark_all()

    def discard(self) -> None:
        """Forget every held chunk (the connection is gone)."""
        self.proxy._bytes_queued -= self.held
        self.held = 0
        self.chunks.clear()

    # --- bandwidth -----------------------------------------------------------

    async def take_tokens(self, size: int) -> int:
        """Wait until the bucket allows a piece of ``size`` bytes (or less);
        return the piece size granted. Unlimited bandwidth grants everything."""
        while True:
            rate = self.proxy._settings.bandwidth
            if rate <= 0:
                return size
            burst = bucket_burst(rate)
            now = trio.current_time()
            if self.tokens_rate <= 0:
                self.tokens = float(burst)  # the bucket starts full
            else:
                self.tokens += (now - self.tokens_at) * self.tokens_rate
            self.tokens_rate = rate
            self.tokens = min(float(burst), self.tokens)
            self.tokens_at = now
            piece = min(size, burst)
            if self.tokens >= piece:
                self.tokens -= piece
                return piece
            await trio.sleep((piece - self.tokens) / rate)


class _Connection:
    """One proxied client connection and, once connected, its target stream."""

    def __init__(self, proxy: WanProxy, client: trio.SocketStream, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.client = client
        self.target: trio.SocketStream | None = None
        self.cancel_scope = trio.CancelScope()
        self.aborted = False
        self.to_target = _Direction(proxy, "to_target")
        self.to_client = _Direction(proxy, "to_client")

    def abort(self, why: str, *, count: bool = True) -> None:
        """Reset both sockets now and stop the pumps. Idempotent. ``count``
        adds one to the proxy's ``resets``."""
        if self.aborted:
            return
        self.aborted = True
        if count:
            self.proxy._resets += 1
        log.debug("connection %d: reset (%s)", self.number, why)
        _reset_close(self.client)
        _reset_close(self.target)
        self.cancel_scope.cancel()

    async def _read(self, src: trio.SocketStream, direction: _Direction) -> None:
        proxy = self.proxy
        while True:
            await proxy._flowing.wait()
            room = await direction.wait_space()
            await proxy._flowing.wait()
            try:
                data = await src.receive_some(min(MAX_CHUNK, room))
            except trio.BrokenResourceError:
                self.abort(f"reset by peer ({direction.name})")
                return
            except trio.ClosedResourceError:
                return
            if not data:
                direction.put(_EOF)
                return
            drop = proxy._settings.drop
            if drop and proxy._rng.random() < drop:
                self.abort(f"dropped a chunk ({direction.name})")
                return
            direction.put(data)

    async def _deliver(self, dst: trio.SocketStream, direction: _Direction) -> None:
        proxy = self.proxy
        while True:
            deliver_at, chunk = await direction.peek()
            await trio.sleep_until(deliver_at)
            try:
                if isinstance(chunk, _Eof):
                    await proxy._flowing.wait()
                    await dst.send_eof()
                    direction.pop()
                    return
                view = memoryview(chunk)
                while view:
                    piece = await direction.take_tokens(len(view))
                    await proxy._flowing.wait()
                    await dst.send_all(view[:piece])
                    view = view[piece:]
                    if direction is self.to_target:
                        proxy._bytes_to_target += piece
                    else:
                        proxy._bytes_to_client += piece
            except trio.BrokenResourceError:
                self.abort(f"peer went away ({direction.name})")
                return
            except trio.ClosedResourceError:
                return
            direction.pop()

    async def run(self) -> None:
        proxy = self.proxy
        try:
            with self.cancel_scope:
                if proxy._partition == "reset":
                    proxy._refused += 1
                    self.abort("refused during a reset partition", count=False)
                    return
                _nodelay(self.client)
                await proxy._flowing.wait()  # blackhole: accepted, not connected onwards
                try:
                    self.target = await trio.open_tcp_stream(*proxy.target)
                except OSError as exc:
                    proxy._connect_failures += 1
                    log.warning("connection %d: cannot connect to %s:%d: %s",
                                self.number, proxy.target[0], proxy.target[1], exc)
                    self.abort("target unreachable", count=False)
                    return
                _nodelay(self.target)
                if self.aborted:
                    return
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, self.client, self.to_target)
                    nursery.start_soon(self._deliver, self.target, self.to_target)
                    nursery.start_soon(self._read, self.target, self.to_client)
                    nursery.start_soon(self._deliver, self.client, self.to_client)
        finally:
            proxy._connections.discard(self)
            self.to_target.discard()
            self.to_client.discard()
            if self.aborted:
                _reset_close(self.client)
                _reset_close(self.target)
            else:
                self.client.socket.close()
                if self.target is not None:
                    self.target.socket.close()
            log.debug("connection %d: closed", self.number)


class WanProxy:
    """A TCP proxy from ``listen`` to ``target`` that behaves like a WAN path.

    ``buffer_limit`` bounds the bytes held per direction per connection.
    See the module docstring for what each setting does.
    """

    def __init__(self, target: tuple[str, int], listen: tuple[str, int] = ("127.0.0.1", 0),
                 settings: WanSettings | None = None, *,
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT) -> None:
        settings = dataclasses.replace(settings) if settings is not None else WanSettings()
        settings.validate()
        if buffer_limit < 1:
            raise ValueError(f"buffer_limit must be >= 1 byte, not {buffer_limit}")
        self.target = (target[0], int(target[1]))
        self.listen = (listen[0], int(listen[1]))
        self.buffer_limit = buffer_limit
        self._settings = settings
        self._rng = random.Random(settings.seed)
        self._listen_address: tuple[str, int] | None = None
        self._connections: set[_Connection] = set()
        self._partition: str | None = None
        self._flowing = trio.Event()
        self._flowing.set()
        self._connections_total = 0
        self._bytes_to_target = 0
        self._bytes_to_client = 0
        self._resets = 0
        self._refused = 0
        self._connect_failures = 0
        self._bytes_queued = 0
        self._peak_bytes_queued = 0

    @property
    def settings(self) -> WanSettings:
        """A copy of the settings in force (change them with :meth:`update`)."""
        return dataclasses.replace(self._settings)

    @property
    def listen_address(self) -> tuple[str, int]:
        """The ``(host, port)`` actually bound; valid once :meth:`serve` has started."""
        if self._listen_address is None:
            raise RuntimeError("the proxy is not listening yet; await nursery.start(proxy.serve)")
        return self._listen_address

    async def serve(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind the listener, report ``(host, port)`` through ``task_status`` and
        proxy connections until cancelled.

        Cancellation closes the listener and every connection (a plain close;
        use :meth:`reset_all` first for resets); nothing is left open.
        """
        listeners = await trio.open_tcp_listeners(self.listen[1], host=self.listen[0])
        try:
            address = listeners[0].socket.getsockname()
            self._listen_address = (address[0], address[1])
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(self._accept_loop, listener, nursery)
                log.info("listening on %s:%d, forwarding to %s:%d",
                         *self._listen_address, *self.target)
                task_status.started(self._listen_address)
        finally:
            for listener in listeners:
                listener.socket.close()

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: wait and retry, like trio does
                log.error("accept failed: %s; retrying in 100 ms", exc)
                await trio.sleep(0.1)
                continue
            self._connections_total += 1
            conn = _Connection(self, stream, self._connections_total)
            self._connections.add(conn)
            nursery.start_soon(conn.run)

    def update(self, **changes: Any) -> None:
        """Change settings at run time; chunks read from now on use them.

        Every change is checked before any is applied: an unknown name or a
        bad value raises ``ValueError``/``TypeError`` and changes nothing.
        A new ``seed`` restarts the random sequence.
        """
        for name, value in changes.items():
            _check_setting(name, value)
        self._settings = dataclasses.replace(self._settings, **changes)
        if "seed" in changes:
            self._rng.seed(changes["seed"])

    def partition(self, mode: str = "blackhole") -> None:
        """Cut the path until :meth:`heal`; ``mode`` is ``"blackhole"`` (hold
        everything, nothing is lost) or ``"reset"`` (abort every connection and
        reset new ones)."""
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition mode must be one of {', '.join(PARTITION_MODES)}, not {mode!r}")
        self._partition = mode
        if self._flowing.is_set():
            self._flowing = trio.Event()
        log.info("partition: %s", mode)
        if mode == "reset":
            self.reset_all()

    def heal(self) -> None:
        """End a partition: held bytes flow again, in order, and new
        connections are connected onwards."""
        if self._partition is not None:
            log.info("partition healed")
        self._partition = None
        self._flowing.set()

    def reset_all(self) -> int:
        """Abort every open connection now (both peers see a reset); return how many."""
        connections = list(self._connections)
        for conn in connections:
            conn.abort("reset by command")
        return len(connections)

    def statistics(self) -> ProxyStatistics:
        """A snapshot of the counters; see :class:`ProxyStatistics`."""
        return ProxyStatistics(
            connections_total=self._connections_total,
            connections_open=len(self._connections),
            bytes_to_target=self._bytes_to_target,
            bytes_to_client=self._bytes_to_client,
            resets=self._resets,
            refused=self._refused,
            connect_failures=self._connect_failures,
            bytes_queued=self._bytes_queued,
            peak_bytes_queued=self._peak_bytes_queued,
            buffer_limit=self.buffer_limit,
            partitioned=self._partition,
        )


# --- control socket -------------------------------------------------------------


def apply_control_request(proxy: WanProxy, request: Any) -> dict[str, Any]:
    """Carry out one control request (a decoded JSON value) on ``proxy`` and
    return the reply; a bad request gets ``{"ok": False, "error": ...}`` and
    changes nothing."""
    if not isinstance(request, dict):
        return {"ok": False, "error": "request must be a JSON object"}
    op = request.get("op")
    fields = {k: v for k, v in request.items() if k != "op"}
    if op == "set":
        try:
            proxy.update(**fields)
        except (TypeError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "settings": dataclasses.asdict(proxy.settings)}
    if op == "partition":
        extra = set(fields) - {"mode"}
        if extra:
            return {"ok": False, "error": f"unknown field {sorted(extra)[0]!r} for op 'partition'"}
        try:
            proxy.partition(fields.get("mode", "blackhole"))
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "partitioned": proxy.statistics().partitioned}
    if op in ("heal", "reset", "stats"):
        if fields:
            return {"ok": False, "error": f"unknown field {sorted(fields)[0]!r} for op {op!r}"}
        if op == "heal":
            proxy.heal()
            return {"ok": True, "partitioned": None}
        if op == "reset":
            return {"ok": True, "reset": proxy.reset_all()}
        return {"ok": True, "stats": dataclasses.asdict(proxy.statistics())}
    if op is None:
        return {"ok": False, "error": "missing field 'op' (one of set, partition, heal, reset, stats)"}
    return {"ok": False, "error": f"unknown op {op!r} (one of set, partition, heal, reset, stats)"}


async def _control_client(proxy: WanProxy, stream: trio.SocketStream) -> None:
    """Answer request lines on one connection until the client closes it."""
    async with stream:
        reader = jsonlines.LineReader(stream, MAX_CONTROL_LINE)
        try:
            while True:
                try:
                    line = await reader.next_line()
                except jsonlines.LineTooLong:
                    await stream.send_all(jsonlines.encode({"ok": False, "error": "request line too long"}))
                    return
                if line is None:
                    return
                if not line.strip():
                    continue
                try:
                    request = json.loads(line)
                except ValueError as exc:
                    reply: dict[str, Any] = {"ok": False, "error": f"not JSON: {exc}"}
                else:
                    reply = apply_control_request(proxy, request)
                await stream.send_all(jsonlines.encode(reply))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _serve_control(proxy: WanProxy, path: str, *,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the control socket at ``path`` (mode 0600) until cancelled, then
    remove it."""
    # The stale-socket probe connects: a thread, so the proxy's loop never blocks on it.
    await trio.to_thread.run_sync(jsonlines.prepare_socket_path, path)
    listener = await jsonlines.open_listener(path, 16)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                nursery.start_soon(_control_client, proxy, stream)
    finally:
        listener.socket.close()  # synchronous: an await here would be cancelled first
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def control_request(path: str | os.PathLike[str], request: dict[str, Any],
                    timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a proxy's control socket and return its reply.

    Blocking, for tests and drills. Raises ``OSError`` if the socket cannot be
    reached or closes without a reply (:class:`transport.jsonlines.NoReply`, a
    ``ConnectionError``), ``TimeoutError`` after ``timeout`` seconds.
    """
    return jsonlines.request(path, request, timeout=timeout, max_reply=MAX_REPLY)


# --- process mode ---------------------------------------------------------------


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be a number in {text!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535 in {text!r}")
    return host, number


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m transport.wanproxy",
        description="A TCP proxy that emulates a WAN path: delay, jitter, bandwidth cap, "
                    "loss (as connection resets) and partitions on command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""\
prints 'listening HOST:PORT' on stdout once ready.

control socket requests (one JSON object per line, one reply line each):
  {"op": "set", "delay": 0.02, "jitter": 0.005, "bandwidth": 1000000, "drop": 0.0}
  {"op": "partition", "mode": "blackhole"}     (or "reset")
  {"op": "heal"}   {"op": "reset"}   {"op": "stats"}

exit codes: 0 stopped by SIGTERM/SIGINT, 1 failed to start, 2 bad arguments

example:
  python -m transport.wanproxy --listen 127.0.0.1:0 --target 127.0.0.1:7801 \\
      --delay 0.02 --jitter 0.005 --control /tmp/wan.sock
""")
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0), metavar="HOST:PORT",
                        help="where to accept connections (default 127.0.0.1:0, an ephemeral port)")
    parser.add_argument("--target", type=_address, required=True, metavar="HOST:PORT",
                        help="where to connect each accepted connection")
    parser.add_argument("--delay", type=float, default=0.0, help="one-way delay in seconds")
    parser.add_argument("--jitter", type=float, default=0.0, help="extra random 0..JITTER seconds per chunk")
    parser.add_argument("--bandwidth", type=int, default=0,
                        help="bytes/s per direction per connection (0 = unlimited)")
    parser.add_argument("--drop", type=float, default=0.0,
                        help="probability per chunk that the connection is reset")
    parser.add_argument("--seed", type=int, default=None, help="seed for jitter and drop")
    parser.add_argument("--control", metavar="PATH", help="Unix socket for run-time control (mode 0600)")
    parser.add_argument("--debug", action="store_true", help="log every connection")
    return parser


async def _run(args: argparse.Namespace, settings: WanSettings) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        proxy = WanProxy(args.target, args.listen, settings)
        async with trio.open_nursery() as nursery:
            try:
                address = await nursery.start(proxy.serve)
            except OSError as exc:
                print(f"wanproxy: cannot listen on {_format_address(args.listen)}: {exc.strerror or exc}",
                      file=sys.stderr)
                nursery.cancel_scope.cancel()
                return 1
            if args.control:
                try:
                    await nursery.start(_serve_control, proxy, args.control)
                except OSError as exc:
                    print(f"wanproxy: cannot open control socket {args.control}: {exc.strerror or exc}",
                          file=sys.stderr)
                    nursery.cancel_scope.cancel()
                    return 1
            print(f"listening {_format_address(address)}", flush=True)
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the proxy as a process (see the module docstring); return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    settings = WanSettings(delay=args.delay, jitter=args.jitter, bandwidth=args.bandwidth,
                           drop=args.drop, seed=args.seed)
    try:
        settings.validate()
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, stream=sys.stderr,
                        format="wanproxy %(levelname)s %(message)s")
    return trio.run(_run, args, settings)


if __name__ == "__main__":
    sys.exit(main())
