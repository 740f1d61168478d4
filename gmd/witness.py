"""The witness daemon (``gmd witness --name W``) and the node daemon's client of it.

A witness is a diskless vote holder at a third site. Node daemons connect to it
like peers (same handshake, same secret, TLS if configured) with an empty
volume name, then send requests as STATE frames and get one STATE reply each:

    {"id": 7, "op": "renew" | "promote" | "query" | "release", "volume": "appslv",
     "identity": "9f0c…" | null, "current": GEN, "history": [GEN, ...], "outdated": [NODE, ...]}
    -> {"id": 7, "granted": true, "reason": "...", "notes": ["..."], "superseded": false, "votes": 1}

    {"id": 8, "op": "status", "volume": "appslv"}
    -> {"id": 8, "granted": false, "reason": "status", "votes": 0,
        "records": [{"volume", "identity", "generation", "parent", "outdated", "primary", "lease"}, ...]}

The decisions are :class:`quorum.witness.WitnessBook`'s. A claim is judged only
against the record of its volume's identity (``identity`` missing or null: a map
from before identities); ``notes`` (also appended to ``reason``) names records of
the same volume name under other identities, which were not applied.

The witness writes its registrations (generation and outdated set per volume
and identity) to its state file before it answers a request that changed them,
so a restarted witness still refuses a member that a primary wrote without. It
holds an exclusive lock on ``<state>.lock`` for its whole life: two witnesses
never share one state file.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import re
import signal
import ssl
from pathlib import Path
from typing import Any, get_args

import trio

from quorum.witness import RENEW_INTERVAL, Claim, WitnessBook, check_identity, short_identity
from statemap.fileio import write_new_file
from transport.codec import Intro, RemoteProtocolError, State
from transport.messages import WitnessOp, WitnessReply, WitnessRequest, decode, intro_problem
from transport.link import (
    PREAUTH_CONNECTIONS,
    HandshakeGate,
    LinkClosed,
    LinkRefused,
    PeerLink,
    accept_secured,
    client_handshake,
    connect_secured,
    server_handshake,
)
from transport.tls import TlsContexts, make_contexts

from .config import Address, Config, config_file_risks
from .configvalues import join_key
from .errors import Refused
from .listeners import open_listeners
from .metrics import MetricsEndpoint, witness_families
from .sdnotify import ServiceNotifier

log = logging.getLogger(__name__)

REFUSALS_REMEMBERED = 1024  # (volume, op, node) keys whose last refusal the log remembers

REQUEST_TIMEOUT = 2.0  # a witness that does not answer in time counts as absent

_OPS = frozenset(get_args(WitnessOp))  # request ops, as the metrics count them (anything else: "invalid")


def _witness_intro(name: str, path: int = 0, session: str = "") -> Intro:
    # Volume "" marks a witness session; geometry does not apply.
    return Intro(node=name, volume="", size=0, region_size=0, extent_size=0, path=path,
                 session=session, info={"witness": True})


class WitnessDaemon:
    """Serves one configured witness until :meth:`stop`; holds its state file's
    lock from construction until :meth:`close`."""

    def __init__(self, config: Config, name: str):
        if name not in config.witnesses:
            known = ", ".join(config.witnesses) or "none"
            raise Refused("no-such-witness", path=config.path, name=name, known=known)
        self.config = config
        self.name = name
        self.witness = config.witnesses[name]
        self.state_path: Path = self.witness.state
        self.listen_addresses: list[tuple[str, int]] = []
        self._stopping = trio.Event()
        # (volume, op, node) -> the kind of its last refusal: a claim refused
        # is repeated every second (an automatic takeover waiting for a
        # lease, say), and the log says each kind once, until it changes.
        self._refused: dict[tuple[str, str, str], str] = {}
        self.tls: TlsContexts | None = None
        if config.tls is not None:
            try:
                self.tls = make_contexts(config.tls.cert, config.tls.key, config.tls.ca)
            except (OSError, ssl.SSLError) as e:
                raise Refused("tls-files", path=config.path, why=e) from None
        self._lock_fd: int | None = lock_state_file(self.state_path, f"witness {name}")
        try:
            _remove_stale_temp_files(self.state_path)
            records = self._load()
        except BaseException:
            self.close()
            raise
        self.book = WitnessBook(trio.current_time(), records)
        # Decide-and-save runs one request at a time: no answer may rest on a
        # registration another request has changed but not yet written.
        self._book_lock = trio.Lock()
        self._noted: set[tuple[str, str | None, str]] = set()  # other-identity notes already logged
        # For the metrics (gmd.metrics): links open per node, requests answered by (op, granted).
        self.links: dict[str, int] = {}
        self.answered: dict[tuple[str, bool], int] = {}
        self.metrics: MetricsEndpoint | None = None
        if self.witness.metrics is not None:
            self.metrics = MetricsEndpoint(self.witness.metrics, join_key(join_key("witnesses", name), "metrics"),
                                           f"witness {name}", self.metric_families)

    def metric_families(self) -> list:
        """This witness's metrics now (gmd.metrics), built on the event loop."""
        return witness_families(self.name, self.book.holdings(trio.current_time()),
                                {node: self.links.get(node, 0) > 0 for node in self.config.nodes}, self.answered)

    def close(self) -> None:
        """Release the state file's lock (the process's exit does too)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self):
        try:
            data = self.state_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise Refused("witness-state-unreadable", name=self.name, path=self.state_path, why=e) from None
        try:
            # Bytes that are not text or not JSON raise ValueError here too.
            raw = json.loads(data)
        except RecursionError:
            raise Refused("witness-state-damaged", name=self.name, path=self.state_path,
                          why="not JSON: nested too deeply") from None
        except ValueError as e:
            raise Refused("witness-state-damaged", name=self.name, path=self.state_path, why=e) from None
        try:
            records, ignored = WitnessBook.records_from_json(raw)
        except ValueError as e:
            # Starting empty could let an outdated member be promoted: refuse.
            raise Refused("witness-state-damaged", name=self.name, path=self.state_path, why=e) from None
        if ignored:
            log.warning("witness %s: state file %s is format 1 (from before volume identities): its "
                        "registrations of %s are ignored, as they name no volume identity and so cannot be "
                        "matched to any volume's life; each primary registers again when it renews", self.name,
                        self.state_path, ", ".join(ignored))
        return records

    def holdings_lines(self) -> list[str]:
        """What the witness holds, one line per record (for the start log)."""
        rows = self.book.holdings(trio.current_time())
        if not rows:
            return [f"witness {self.name}: holds no registrations"]
        return [f"witness {self.name}: holds volume {r['volume']} identity {short_identity(r['identity'])}: "
                f"generation {r['generation'] or '(none)'}, primary {r['primary'] or '(none)'}, "
                f"outdated: {', '.join(r['outdated']) or 'none'}" for r in rows]

    async def _save(self) -> None:
        data = json.dumps(self.book.to_json(), indent=1).encode()
        # fsyncs take long on a busy disk: off the event loop, so other nodes'
        # requests and the links' keepalives go on meanwhile.
        await trio.to_thread.run_sync(write_state_file, self.state_path, data)

    def stop(self) -> None:
        self._stopping.set()

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            if self.metrics is not None:
                await n.start(self.metrics.serve)
            for addr in self.witness.addresses:
                listeners = await open_listeners(addr, f"witness {self.name}")
                self.listen_addresses.append(listeners[0].socket.getsockname()[:2])
                gate = HandshakeGate(PREAUTH_CONNECTIONS, f"witness {self.name} listener {addr.host}:{addr.port}")
                n.start_soon(trio.serve_listeners, functools.partial(self._accept, gate=gate), listeners)
            log.info("witness %s: listening on %s; granting nothing for the first %.1f s", self.name,
                     ", ".join(f"{h}:{p}" for h, p in self.listen_addresses),
                     self.book.quiet_until - trio.current_time())
            for line in self.holdings_lines():
                log.info("%s", line)
            task_status.started(self)
            await self._stopping.wait()
            n.cancel_scope.cancel()

    async def _accept(self, raw: trio.SocketStream, *, gate: HandshakeGate) -> None:
        peer = raw.socket.getpeername()
        label = f"witness {self.name}<-{peer[0]}:{peer[1]}"
        if not gate.try_enter():
            await trio.aclose_forcefully(raw)
            return
        try:
            stream = await accept_secured(raw, self.tls, label=label)
            if stream is None:
                return

            def reply_to(hello: Intro) -> Intro | str:
                if hello.volume != "":
                    return f"{self.name} is a witness, not a member of volume {hello.volume}"
                if hello.node not in self.config.nodes:
                    return f"{hello.node} is not a configured node"
                problem = intro_problem(hello.info, f"intro of {hello.node}")
                if problem:
                    return problem
                return _witness_intro(self.name, hello.path, hello.session)

            try:
                link = await server_handshake(stream, self.name, self.config.secret, reply_to, label=label)
            except LinkRefused:
                return
        finally:
            gate.leave()
        node = link.remote.node
        link.label = f"witness {self.name}<-{node}"
        log.info("witness %s: node %s connected", self.name, node)
        self.links[node] = self.links.get(node, 0) + 1
        try:
            async with trio.open_nursery() as n:
                link.start(n)
                try:
                    while True:
                        ev = await link.receive()
                        if isinstance(ev, State):
                            await link.send(State(await self._answer(node, ev.fields)))
                except LinkClosed as e:
                    log.info("witness %s: node %s disconnected: %s", self.name, node, e)
                n.cancel_scope.cancel()
        finally:
            self.links[node] -= 1

    async def _answer(self, node: str, req: dict[str, Any]) -> dict[str, Any]:
        """The reply to one request from ``node``; a bad request is answered as such."""
        reply = await self._reply(node, req)
        op = req.get("op") if isinstance(req, dict) else None
        key = (op if op in _OPS else "invalid", bool(reply.get("granted")))
        self.answered[key] = self.answered.get(key, 0) + 1
        return reply

    async def _reply(self, node: str, req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("id") if isinstance(req, dict) else None
        try:
            try:
                r = decode(WitnessRequest, req, "witness request")
            except RemoteProtocolError as e:
                raise ValueError(str(e)) from None
            vol = self.config.volumes.get(r.volume)
            if vol is None or node not in vol.members:
                raise ValueError(f"{node} is not a member of a volume {r.volume!r}")
            if r.op == "status":
                return {"id": rid, "granted": False, "reason": "status", "votes": 0,
                        "records": self.book.holdings(trio.current_time(), r.volume)}
            if r.current is None:
                raise ValueError(f"{r.op} needs the claimed generation ('current')")
            claim = Claim(r.volume, node, r.current, r.history, frozenset(r.outdated), check_identity(r.identity))
            async with self._book_lock:
                return await self._decide(rid, r.op, claim)
        except ValueError as e:
            return {"id": rid, "granted": False, "reason": f"bad request: {e}", "votes": 0}

    async def _decide(self, rid: Any, op: str, claim: Claim) -> dict[str, Any]:
        now = trio.current_time()
        if op == "release":
            self.book.release(claim.volume, claim.node, claim.identity)
            return {"id": rid, "granted": True, "reason": "released", "votes": 0}
        before = self.book.to_json()
        decision = getattr(self.book, op)(claim, now)
        self._log_notes(claim, decision.notes)
        if decision.record_changed:
            try:
                await self._save()
            except OSError as e:
                # Unsaved, the grant could be forgotten by a restart: withdraw it.
                self.book = WitnessBook(now, WitnessBook.records_from_json(before)[0], fresh_start=True)
                log.error("witness %s: cannot write %s: %s; granting nothing", self.name, self.state_path, e)
                return {"id": rid, "granted": False, "reason": f"witness cannot save its state: {e}", "votes": 0}
            log.info("witness %s: %s (identity %s): %s registered generation %s (outdated: %s)", self.name,
                     claim.volume, short_identity(claim.identity), claim.node, claim.current,
                     ", ".join(sorted(claim.outdated)) or "none")
        key = (claim.volume, op, claim.node)
        if op != "query" and not decision.granted:
            kind = re.sub(r"\d+(\.\d+)?", "N", decision.reason)  # "4.0 s more" and "3.0 s more" are one kind
            if len(self._refused) >= REFUSALS_REMEMBERED and key not in self._refused:
                self._refused.clear()  # bounded, whatever names the claims carry
            level = logging.INFO if self._refused.get(key) != kind else logging.DEBUG
            self._refused[key] = kind
            log.log(level, "witness %s: %s: %s %s refused: %s", self.name, claim.volume, op, claim.node,
                    decision.reason)
        elif decision.granted:
            self._refused.pop(key, None)
        return {"id": rid, "granted": decision.granted, "reason": decision.reason, "notes": list(decision.notes),
                "superseded": decision.superseded, "votes": self.witness.votes if decision.granted else 0}

    def _log_notes(self, claim: Claim, notes: tuple[str, ...]) -> None:
        # Once per witness life for each claimed identity and note: the same
        # request repeats every second.
        for note in notes:
            key = (claim.volume, claim.identity, note)
            if key not in self._noted:
                self._noted.add(key)
                log.warning("witness %s: %s claims volume %s with identity %s; %s", self.name, claim.node,
                            claim.volume, short_identity(claim.identity), note)


def lock_state_file(state: Path, who: str) -> int:
    """Lock ``<state>.lock`` exclusively for this process's life and write its pid
    there; the open descriptor is returned. GmdError naming the path (and the
    holder's pid) if another process holds it."""
    lock_path = state.with_name(state.name + ".lock")
    try:
        state.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise Refused("witness-lock-unopenable", who=who, path=lock_path, why=e.strerror) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise Refused("witness-lock-failed", who=who, path=lock_path, why=e.strerror) from None
        raise Refused("witness-state-shared", who=who, state=state, holder=holder or "unknown",
                      path=lock_path) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _remove_stale_temp_files(state: Path) -> None:
    # Left by a witness killed while saving; with the lock held, none is in use.
    prefix = f".{state.name}.tmp"
    try:
        names = os.listdir(state.parent)
    except OSError:
        return
    for stale in names:
        if stale.startswith(prefix):
            (state.parent / stale).unlink(missing_ok=True)


def write_state_file(path: Path, data: bytes) -> None:
    """Replace the witness state file atomically and durably (temp, fsync,
    rename, directory fsync); blocking, so it runs in a thread."""
    write_new_file(path, len(data), [(0, data)], mode=0o600)


async def run_witness(config: Config, name: str) -> None:
    """``gmd witness``: serve until SIGTERM/SIGINT; under systemd, READY=1 once
    listening and STOPPING=1 when a stop begins."""
    for risk in config_file_risks(config.path):
        log.warning("witness %s: %s; whoever can change it decides the cluster's votes: make it root's, "
                    "mode 0600 or 0640", name, risk)
    notifier = ServiceNotifier.from_environment()
    daemon = WitnessDaemon(config, name)
    try:
        await _serve_until_signal(daemon, name, notifier)
    finally:
        daemon.close()
        notifier.close()


async def _serve_until_signal(daemon: WitnessDaemon, name: str, notifier: ServiceNotifier) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as outer:

            async def watch_signals():
                async for signum in signals:
                    log.info("witness %s: %s received; stopping", name, signal.Signals(signum).name)
                    notifier.stopping(f"witness {name}: stopping")
                    daemon.stop()

            outer.start_soon(watch_signals)
            async with trio.open_nursery() as n:
                await n.start(daemon.serve)
                listen = ",".join(f"{h}:{p}" for h, p in daemon.listen_addresses)
                print(f"ready witness={name} listen={listen}", flush=True)
                notifier.ready(f"witness {name}: listening on {listen}; "
                               f"{len(daemon.book.holdings(trio.current_time()))} registrations")
            outer.cancel_scope.cancel()


# ------------------------------------------------------------------ node side


class WitnessClient:
    """A node daemon's connection to one witness: kept up with backoff; requests
    answered in order of their ids."""

    def __init__(self, config: Config, node: str, name: str, tls: TlsContexts | None):
        self.config = config
        self.node = node
        self.name = name
        self.witness = config.witnesses[name]
        self.votes = self.witness.votes
        self.tls = tls
        self.link: PeerLink | None = None
        self.reason: str | None = "not connected yet"
        self._next_id = 1
        self._waiting: dict[int, trio.MemorySendChannel] = {}
        self.changed = trio.Event()

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.link.closed

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self) -> None:
        backoff = 0.1
        while True:
            for addr in self.witness.addresses:
                try:
                    link = await self._dial(addr)
                except LinkRefused as e:
                    self.reason = str(e)
                    continue
                backoff = 0.1
                self.link, self.reason = link, None
                self._notify()
                try:
                    async with trio.open_nursery() as n:
                        link.start(n)
                        await self._receive(link)
                        n.cancel_scope.cancel()
                finally:
                    self.link = None
                    self.reason = link.close_reason or "connection lost"
                    for ch in self._waiting.values():
                        ch.close()
                    self._waiting.clear()
                    self._notify()
                    with trio.CancelScope(shield=True):
                        await link.aclose(self.reason, tell_peer=False)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, RENEW_INTERVAL)

    async def _dial(self, addr: Address) -> PeerLink:
        label = f"{self.node}->witness {self.name} {addr}"
        stream = await connect_secured(addr.host, addr.port, self.tls, label=label, what=f"witness {self.name}")

        def check(hello: Intro) -> str | None:
            if hello.node != self.name or hello.volume != "":
                return f"{addr} answered as {hello.node!r}, not as witness {self.name}"
            return intro_problem(hello.info, f"intro of witness {self.name}")

        return await client_handshake(stream, _witness_intro(self.node), self.config.secret, check,
                                      label=label)

    async def _receive(self, link: PeerLink) -> None:
        while True:
            try:
                with trio.fail_after(3 * RENEW_INTERVAL + REQUEST_TIMEOUT):
                    ev = await link.receive()
            except (LinkClosed, trio.TooSlowError):
                return
            if isinstance(ev, State):
                try:
                    reply = decode(WitnessReply, ev.fields, f"reply of witness {self.name}")
                except RemoteProtocolError as e:
                    log.warning("%s: closing the link: %s", link.label, e)
                    await link.aclose(f"protocol error: {e}")
                    return
                ch = self._waiting.pop(reply.id, None)
                if ch is not None:
                    ch.send_nowait(ev.fields)
                    ch.close()

    async def ask(self, op: str, fields: dict[str, Any]) -> dict[str, Any] | None:
        """One request; the reply, or None when the witness is unreachable or
        does not answer within :data:`REQUEST_TIMEOUT`."""
        link = self.link
        if link is None or link.closed:
            return None
        rid = self._next_id
        self._next_id += 1
        send, receive = trio.open_memory_channel(1)
        self._waiting[rid] = send
        try:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await link.send(State({"id": rid, "op": op, **fields}))
                try:
                    return await receive.receive()
                except trio.EndOfChannel:
                    return None
            return None
        except LinkClosed:
            return None
        finally:
            self._waiting.pop(rid, None)
