"""The node daemon: one trio process hosting every volume configured for a node.

Lifecycle is owned by :meth:`NodeDaemon.serve`: the peer listeners and the
control socket start inside one nursery and report readiness with
``task_status.started()``; SIGTERM/SIGINT bring every volume down cleanly (flush,
state maps marked clean, links closed) before the process exits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import ssl
from dataclasses import replace
from typing import Any

import trio

from transport.link import (
    PREAUTH_CONNECTIONS,
    HandshakeGate,
    LinkRefused,
    PeerLink,
    accept_secured,
    client_handshake,
    connect_secured,
    server_handshake,
)
from transport import jsonlines
from transport.tls import TlsContexts, make_contexts

from statemap.errors import StateMapError

from .config import Address, Config, ConfigError, config_file_risks, load_config
from .configvalues import join_key
from .control import MAX_CONTROL_CLIENTS, MAX_REQUEST, prepare_socket_path
from .engine import NodePorts, VolumeEngine
from .errors import ExitCode, GmdError, Refused, exit_code_for
from .eventfeed import EventFeed
from .events import LogEvents
from .fuse import VolumeFS, serve_fuse
from .groups import GroupHold, GroupMarks
from .hooks import HookRunner
from .listeners import open_listeners
from .memory import bound_heap
from .metrics import MetricsEndpoint, node_families, sample_volume
from .requests import check_request, decode_line, op_of
from .sdnotify import ServiceNotifier
from .witness import WitnessClient

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 60.0  # seconds one volume has to go down cleanly when the daemon stops


class NodeDaemon:
    """Everything one node runs. Create, then ``await nursery.start(daemon.serve)``."""

    def __init__(self, config: Config, node: str, *, mount: bool = True):
        self.config = config
        self.mount = mount  # serve the FUSE mount (one per process: pyfuse3 is global)
        self.fs = None
        self.node = node
        self.node_config = config.node(node)
        self.limiter = trio.CapacityLimiter(16)
        self.engines: dict[str, VolumeEngine] = {}
        self.nursery: trio.Nursery | None = None
        self.listen_addresses: list[tuple[str, int]] = []
        self._stopping = trio.Event()
        self._control_clients = 0  # control connections being served now
        self._control_full_logged = False
        self.tls: TlsContexts | None = None
        if config.tls is not None:
            try:
                self.tls = make_contexts(config.tls.cert, config.tls.key, config.tls.ca)
            except (OSError, ssl.SSLError) as e:
                raise Refused("tls-files", path=config.path, why=e) from None
        self.witness_clients = {w: WitnessClient(config, node, w, self.tls) for w in config.witnesses}
        # What a volume engine gets of this node: no back-pointer to the daemon.
        self.ports = NodePorts(dial=self.dial, peer_addresses=lambda name: self.config.node(name).addresses,
                               limiter=self.limiter, witnesses=self.witness_clients, host=self._host_nursery)
        for vol in config.volumes_for_node(node):
            self._add_engine(VolumeEngine(vol, node, self.ports))
        self.groups = self._consistency_groups()
        # gmd events: the volumes' state changes, and the hooks that run on them
        self.events = EventFeed(node, lambda: self.engines, wanted=self._events_wanted)
        self.hooks = HookRunner(self.events.hub, self._hooks_of)
        self.metrics: MetricsEndpoint | None = None
        if self.node_config.metrics is not None:
            self.metrics = MetricsEndpoint(self.node_config.metrics, join_key(join_key("nodes", node), "metrics"),
                                           f"node {node}", self.metric_families)

    def _add_engine(self, engine: VolumeEngine) -> None:
        self.engines[engine.name] = engine
        # A role change is told at once, not at the feed's next look.
        engine.subscribe_role_change(lambda _engine: self.events.poke())

    def _events_wanted(self) -> bool:
        """Someone reads the events (gmd events), or a volume has hooks."""
        return self.events.hub.readers > 0 or any(e.config.hooks for e in self.engines.values())

    def _hooks_of(self, volume: str):
        engine = self.engines.get(volume)
        return engine.config.hooks if engine is not None else ()

    def _consistency_groups(self) -> dict[str, GroupMarks]:
        """The marks this node puts into its groups' streams as primary, and
        the hold its async members of a group keep (gmd.groups)."""
        groups: dict[str, GroupMarks] = {}
        for engine in self.engines.values():
            g = engine.config.group
            if g is None:
                continue
            groups.setdefault(g, GroupMarks(g)).volumes.append(engine)
        for g, marks in groups.items():
            held = [e for e in marks.volumes if e.config.members[self.node].mode == "async"]
            hold = GroupHold(g, [e.name for e in held])
            for e in held:
                e.group_hold = hold
        return groups

    # ------------------------------------------------------------- serving

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED, control: bool = True) -> None:
        """Run until :meth:`stop`; readiness once listeners and control socket are up.

        One exit stack owns everything the node holds, and releases it in the
        reverse order it was taken, whatever ended the run (a stop, or a
        crashed task): first every volume goes down (each state map is marked
        clean only by a clean close), then the nursery is cancelled, which ends
        the control socket (unlinked), the FUSE mount (unmounted), the witness
        clients and the peer listeners, each in its own ``finally``."""
        async with contextlib.AsyncExitStack() as stack:
            n = await stack.enter_async_context(trio.open_nursery())
            self.nursery = n
            stack.callback(n.cancel_scope.cancel)
            stack.callback(setattr, self, "nursery", None)
            stack.push_async_callback(self.shutdown)
            n.start_soon(self.events.run)
            n.start_soon(self.hooks.run)
            # What the daemon warns of is an event too; not the hooks' own
            # results (a "hook" event says those), so no hook feeds itself.
            log_events = LogEvents(self.events.hub, lambda name: name == self.node or name in self.engines,
                                   quiet=("gmd.hooks",))
            logging.getLogger("gmd").addHandler(log_events)
            stack.callback(logging.getLogger("gmd").removeHandler, log_events)
            for i, addr in enumerate(self.node_config.listen_addresses):
                bound = await n.start(self._listen, addr, i)
                self.listen_addresses.append(bound)
            if self.metrics is not None:
                await n.start(self.metrics.serve)
            for client in self.witness_clients.values():
                n.start_soon(client.run)
            for marks in self.groups.values():
                n.start_soon(marks.run)
            if self.mount:
                self.fs = VolumeFS(self.engines, self.node_config.mount, self.node)
                await n.start(serve_fuse, self.fs)
            if control:
                await n.start(self._serve_control)
            task_status.started(self)
            await self._stopping.wait()

    def metric_families(self) -> list:
        """This node's metrics now (gmd.metrics), built on the event loop."""
        return node_families(self.node, [sample_volume(e) for e in self.engines.values()],
                             {w: c.connected for w, c in self.witness_clients.items()})

    def _host_nursery(self) -> trio.Nursery:
        """Where a volume's runner task lives (it owns every other task of the volume)."""
        if self.nursery is None:
            raise Refused("daemon-not-serving", node=self.node)
        return self.nursery

    def stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopping.is_set()

    async def stop_requested(self) -> None:
        """Return once :meth:`stop` was called (a signal, or the control op)."""
        await self._stopping.wait()

    async def attach_configured(self, progress=lambda text: None) -> list[str]:
        """Attach the volumes this node's ``up`` and ``up_loop`` keys name, in
        file order, each as 'gmd up' (``--loop`` for ``up_loop``) would; the
        names attached. ``progress`` gets a line before each. The first that
        fails raises ``Refused("up-at-start-failed")`` naming it and why; those
        attached before stay up (stopping the daemon takes them down cleanly).
        A stop requested meanwhile ends the loop early."""
        wanted = set(self.node_config.up) | set(self.node_config.up_loop)
        attached = []
        for name, engine in self.engines.items():
            if name not in wanted or self.stopping:
                continue
            loop = name in self.node_config.up_loop
            progress(f"attaching {name}" + (" (loop device when primary)" if loop else ""))
            try:
                await engine.up(loop=loop)
            except Exception as e:  # whatever it was, the operator must read which volume and why
                if not isinstance(e, EXPECTED_ERRORS):
                    log.exception("%s: attaching %s at start failed", self.node, name)
                raise Refused("up-at-start-failed", volume=name, why=_one_line(e), node=self.node,
                              key="up_loop" if loop else "up") from e
            attached.append(name)
        return attached

    def service_status(self) -> str:
        """One line for the service manager: each volume's role and disk here."""
        parts = []
        for name, engine in self.engines.items():
            if not engine.is_up:
                parts.append(f"{name} down")
            else:
                parts.append(f"{name} {engine.role.value} {engine.local.statemap.sb.disk.value}")
        return f"node {self.node}: " + (", ".join(parts) or "no volumes")

    async def shutdown(self) -> None:
        """Bring every volume down cleanly."""
        with trio.CancelScope(shield=True):
            for engine in self.engines.values():
                try:
                    # Shielded, but bounded: a volume that cannot close in time stays dirty.
                    with trio.fail_after(SHUTDOWN_GRACE):
                        await engine.down(force=True)  # the operator stopped the node
                except Exception as e:  # trio.TooSlowError too
                    log.error("%s: could not close cleanly on stop (%s: %s); its state map stays marked "
                              "dirty, so crash recovery runs at its next start", engine.name, type(e).__name__, e)

    async def _listen(self, addr: Address, path_index: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await open_listeners(addr, f"node {self.node}")
        bound = listeners[0].socket.getsockname()[:2]
        log.info("%s: listening for peers on %s:%d", self.node, bound[0], bound[1])
        task_status.started(bound)
        gate = HandshakeGate(PREAUTH_CONNECTIONS, f"{self.node} listener {bound[0]}:{bound[1]}")
        await trio.serve_listeners(functools.partial(self._accept, gate=gate), listeners)

    async def _accept(self, raw: trio.SocketStream, *, gate: HandshakeGate) -> None:
        peer = raw.socket.getpeername()
        label = f"{self.node}<-{peer[0]}:{peer[1]}"
        if not gate.try_enter():
            await trio.aclose_forcefully(raw)
            return
        try:
            link, engine = await self._authenticate(raw, label)
        finally:
            gate.leave()
        if link is None:
            return
        if link.remote.info.get("poke"):  # the member came up: our dial loop redials now
            engine.poked(link.remote.node)
            await link.aclose("poke noted", tell_peer=False)
            return
        link.label = f"{engine.name}:{self.node}<-{link.remote.node}#{link.remote.path}"
        await engine.run_accepted_path(link)

    async def _authenticate(self, raw: trio.SocketStream, label: str) -> tuple[PeerLink | None, VolumeEngine | None]:
        """TLS (when configured) and the peer handshake of one accepted
        connection: the link and the volume it serves, or (None, None)."""
        stream = await accept_secured(raw, self.tls, label=label)
        if stream is None:
            return None, None
        engine_box: list[VolumeEngine] = []

        def reply_to(hello):
            engine = self.engines.get(hello.volume)
            if engine is None:
                return f"node {self.node} has no member of volume {hello.volume}"
            reason = engine.check_peer_hello(hello)
            if reason:
                # Authenticated: the peer may see who refuses it, and judge us too.
                if engine.local is None or engine.going_down:
                    return reason
                return engine.make_intro(hello.path, hello.session), reason
            engine_box.append(engine)
            return engine.make_intro(hello.path, hello.session)

        try:
            link = await server_handshake(stream, self.node, self.config.secret, reply_to, label=label)
        except LinkRefused:
            return None, None
        return link, engine_box[0]

    async def dial(self, engine: VolumeEngine, addr: Address, path: int, session: str, *,
                   poke: bool = False) -> PeerLink:
        """Connect and authenticate one path of ``engine``'s member at ``addr``
        (with ``poke``, only to tell it to dial us; see VolumeEngine._poke)."""
        label = f"{engine.name}:{self.node}->{addr}#{path}"
        stream = await connect_secured(addr.host, addr.port, self.tls, label=label, what=f"node {addr}")
        return await client_handshake(
            stream, engine.make_intro(path, session, poke=poke), self.config.secret,
            engine.check_peer_hello, label=label,
        )

    # ------------------------------------------------------------- control

    async def _serve_control(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path = self.node_config.control
        # The stale-socket probe connects: a thread, so the loop never blocks on it.
        await trio.to_thread.run_sync(prepare_socket_path, path)
        listener = await jsonlines.open_listener(path, MAX_CONTROL_CLIENTS)
        log.info("%s: control socket %s", self.node, path)
        task_status.started()
        try:
            await trio.serve_listeners(self._control_client, [listener])
        finally:
            try:
                path.unlink()
            except OSError:
                pass

    async def _control_client(self, stream: trio.SocketStream) -> None:
        """One control connection: one request line in (within the node's
        ``control_timeout``), one reply line out. At most MAX_CONTROL_CLIENTS at
        a time: beyond that a connection gets a one-line refusal, so idle clients
        cannot hold the daemon's file descriptors or memory."""
        timeout = self.node_config.control_timeout
        try:
            if self._control_clients >= MAX_CONTROL_CLIENTS:
                if not self._control_full_logged:  # once per overload, not once per connection
                    log.warning("%s: %d control connections open; refusing more until one ends",
                                self.node, self._control_clients)
                    self._control_full_logged = True
                with trio.move_on_after(timeout):
                    await stream.send_all(_error_line("too many control connections", ExitCode.FAILED))
                return
            self._control_clients += 1
            try:
                reply = await self._control_exchange(stream, timeout)
                reader = reply.pop("_reader", None) if reply is not None else None
                if reply is not None:
                    with trio.move_on_after(timeout):  # a client that never reads its reply
                        await stream.send_all(jsonlines.encode(reply))
                self.events.poke()  # a request may have changed a state: tell it now
                if reader is not None:  # gmd events: the stream follows, until the client closes it
                    await self.events.serve_reader(stream, *reader)
            finally:
                self._control_clients -= 1
                if self._control_clients < MAX_CONTROL_CLIENTS:
                    self._control_full_logged = False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def _control_exchange(self, stream: trio.SocketStream, timeout: float) -> dict[str, Any] | None:
        """Read one request line and answer it; None if the client went away."""
        with trio.move_on_after(timeout) as idle:
            try:
                line = await jsonlines.LineReader(stream, MAX_REQUEST).next_line()
            except jsonlines.LineTooLong:
                log.warning("%s: control request refused: longer than %d bytes", self.node, MAX_REQUEST)
                return _error_reply("request too large", ExitCode.USAGE)
            if line is None:
                return None
        if idle.cancelled_caught:
            log.info("%s: control client sent no complete request within %d s; closed", self.node, timeout)
            return _error_reply(f"no complete request line within {timeout} s", ExitCode.USAGE)
        op = "request"
        try:
            value = decode_line(line)
            op = op_of(value) or op
            return await self.handle_control(value)
        except EXPECTED_ERRORS as e:
            # Bad input or a refusal: the reason is the whole story, no traceback.
            log.warning("%s: control %s failed: %s", self.node, op, _one_line(e))
            return _error_reply(str(e), exit_code_for(e))
        except Exception as e:  # a bug: every failure becomes an answer, never a dead daemon
            log.exception("%s: control request %r failed", self.node, line[:200])
            return _error_reply(f"{type(e).__name__}: {e}", exit_code_for(e))

    async def reload(self) -> dict[str, Any]:
        """``gmd reload``: re-read the config file and apply what can change while
        volumes are in use: members added to a volume, volumes added for this
        node (they stay down until 'gmd up'), and how data is shipped to each
        member (compression, bandwidth limits: from the next piece sent on).
        Anything else is refused with the differences named, and nothing is
        applied."""
        new = load_config(self.config.path)
        problems = []
        if self.node not in new.nodes:
            problems.append(f"node {self.node} is gone from the config")
        if new.secret != self.config.secret or new.tls != self.config.tls:
            problems.append("secret or tls changed (restart the daemons)")
        if new.witnesses != self.config.witnesses:
            problems.append("witnesses changed (restart the daemons)")
        if self.node in new.nodes and new.node(self.node).metrics != self.node_config.metrics:
            problems.append("metrics changed (restart the daemon)")
        mine = {v.name: v for v in new.volumes_for_node(self.node)} if not problems else {}
        for name, engine in self.engines.items():
            old, vol = engine.config, mine.get(name)
            if vol is None:
                if not problems:
                    problems.append(f"volume {name} is gone (take it down and restart the daemon)")
                continue
            for field_name in ("size", "region_size", "extent_size", "mode", "async_queue", "group"):
                if getattr(old, field_name) != getattr(vol, field_name):
                    problems.append(f"volume {name}: {field_name} changed ({getattr(old, field_name)} -> "
                                    f"{getattr(vol, field_name)})")
            for member, m in old.members.items():
                new_m = vol.members.get(member)
                # An undo log's bound, how data is shipped to a member
                # (compression, bandwidth), and the space of the next test
                # failover may change online (the engine applies them at
                # once); nothing else of a member may.
                if new_m is None or replace(new_m, undo_log_size=m.undo_log_size, shipping=m.shipping,
                                            test_image_size=m.test_image_size) != m:
                    problems.append(f"volume {name}: member {member} changed or removed")
        if problems:
            raise Refused("reload-refused", path=self.config.path, problems="; ".join(problems))
        self.config = new
        self.node_config = new.node(self.node)
        added: dict[str, list[str]] = {}
        for name, vol in mine.items():
            if name not in self.engines:
                self._add_engine(VolumeEngine(vol, self.node, self.ports))
                added[name] = ["(new volume)"]
            else:
                members = await self.engines[name].add_members(vol)
                if members:
                    added[name] = members
                self.engines[name].resize_undo_log()
        log.info("%s: config reloaded from %s (added: %s)", self.node, new.path,
                 "; ".join(f"{v}: {', '.join(m)}" for v, m in added.items()) or "nothing")
        return {"added": added}

    def _engine(self, req: dict[str, Any]) -> VolumeEngine:
        name = req["volume"]
        if name not in self.engines:
            known = ", ".join(self.engines) or "none"
            raise Refused("no-such-volume", node=self.node, volume=name, known=known)
        return self.engines[name]

    async def handle_control(self, request: Any) -> dict[str, Any]:
        """One control request (decoded JSON), checked against :data:`gmd.requests.OPS`
        before anything is done; the reply carries ``ok`` and the op's result."""
        req = check_request(request)
        op = req["op"]
        if op == "ping":
            return {"ok": True, "node": self.node, "pid": os.getpid()}
        if op == "status":
            if req["volume"] is None:
                out = []
                for e in self.engines.values():
                    out.append(e.status() if e.is_up else {"volume": e.name, "node": self.node, "daemon": True, "up": False})
                return {"ok": True, "volumes": out}
            engine = self._engine(req)
            if not engine.is_up:
                return {"ok": True, "status": None, "up": False}
            return {"ok": True, "status": engine.status(), "up": True}
        if op == "up":
            await self._engine(req).up(loop=req["loop"])
            return {"ok": True}
        if op == "down":
            await self._engine(req).down(force=req["force"])
            return {"ok": True}
        if op == "primary":
            engine = self._engine(req)
            await engine.promote(force=req["force"])
            return {"ok": True, "device": engine.device_path, "loop": engine.loop_device}
        if op == "secondary":
            await self._engine(req).demote(force=req["force"])
            return {"ok": True}
        if op == "verify":  # starts it; the client follows it in the status (it may take hours)
            return {"ok": True, "members": self._engine(req).start_verify()}
        if op == "resync":
            return {"ok": True, "started": self._engine(req).resync(req["rate"])}
        if op == "resolve":  # the schema allows only discard "local"
            return {"ok": True, **(await self._engine(req).resolve(dry_run=req["dry_run"]))}
        if op == "switchover":
            return {"ok": True, **(await self._engine(req).switchover(req["to"]))}
        if op == "reload":
            return {"ok": True, **(await self.reload())}
        if op == "quorum":
            engine = self._engine(req)
            if "expected_votes" in req:  # null: back to the configured sum
                return {"ok": True, "quorum": await engine.set_expected_votes(req["expected_votes"])}
            return {"ok": True, "quorum": engine.status()["quorum"]}
        if op == "test_failover":
            engine = self._engine(req)
            if req["action"] == "start":
                return {"ok": True, "test_failover": await engine.start_test_failover(loop=req["loop"],
                                                                                    space=req["space"])}
            return {"ok": True, "test_failover": await engine.end_test_failover()}
        if op == "events":  # the reply, then the events until the client closes (see _control_client)
            if req["volume"] is not None:
                self._engine(req)  # a volume this node has
            sub, first = self.events.open_reader(req["volume"], req["now"])
            return {"ok": True, "events": True, "_reader": (sub, first)}
        if op == "stop":
            self.stop()
            return {"ok": True}
        raise AssertionError(f"op {op!r} is in gmd.requests.OPS but has no branch here")


# What a control request may fail with in ordinary use (bad input, a refusal, a
# damaged or missing state map, a config that does not load): logged as one line.
EXPECTED_ERRORS = (GmdError, StateMapError, ConfigError, OSError)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _error_reply(message: str, code: int) -> dict[str, Any]:
    return {"ok": False, "error": message, "exit_code": int(code)}


def _error_line(message: str, code: int) -> bytes:
    return jsonlines.encode(_error_reply(message, code))


SERVICE_STATUS_INTERVAL = 5.0  # seconds between checks of the line 'systemctl status' shows


async def _keep_service_status(daemon: NodeDaemon, notifier: ServiceNotifier) -> None:
    """Keep the service manager's STATUS= line current (roles change after start)."""
    shown = daemon.service_status()
    while True:
        await trio.sleep(SERVICE_STATUS_INTERVAL)
        line = daemon.service_status()
        if line != shown:
            notifier.status(line)
            shown = line


async def run_daemon(config: Config, node: str, mount: bool = True) -> None:
    """``gmd daemon``: serve, attach the volumes the config brings up at start,
    report readiness (a ``ready`` line on stdout and, under systemd, READY=1),
    then run until SIGTERM/SIGINT and stop cleanly (STOPPING=1 first). A volume
    that cannot come up at start stops the daemon cleanly and raises (exit 1,
    never ready): see :meth:`NodeDaemon.attach_configured`."""
    log.info("%s: %s", node, bound_heap())
    for risk in config_file_risks(config.path):
        log.warning("%s: %s; its start and stop commands run as root: make it root's, mode 0600 or 0640",
                    node, risk)
    daemon = NodeDaemon(config, node, mount=mount)
    notifier = ServiceNotifier.from_environment()
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as outer:

                async def watch_signals():
                    async for signum in signals:
                        log.info("%s: %s received; stopping cleanly", node, signal.Signals(signum).name)
                        daemon.stop()

                outer.start_soon(watch_signals)
                failure = await _serve_until_stopped(daemon, notifier)
                # serve() returned: every volume is down cleanly.
                outer.cancel_scope.cancel()
    finally:
        notifier.close()
    if failure is not None:
        raise failure  # after the clean stop: gmd prints it last
    log.info("%s: stopped", node)


async def _serve_until_stopped(daemon: NodeDaemon, notifier: ServiceNotifier) -> Refused | None:
    """Serve ``daemon`` and attach its configured volumes, report readiness,
    and return once it has stopped cleanly: the reason it could not start, if
    one of those volumes failed to come up, else None."""
    node, failure = daemon.node, None
    async with trio.open_nursery() as n:
        notifier.status(f"node {node}: starting")
        await n.start(daemon.serve)
        try:
            await daemon.attach_configured(lambda text: notifier.status(f"node {node}: {text}"))
        except Refused as e:
            failure = e
            daemon.stop()
        if failure is None and not daemon.stopping:
            print(f"ready node={node} control={daemon.node_config.control} "
                  f"peers={','.join(f'{h}:{p}' for h, p in daemon.listen_addresses)}", flush=True)
            notifier.ready(daemon.service_status())
        async with trio.open_nursery() as status_updates:
            if notifier.active:
                status_updates.start_soon(_keep_service_status, daemon, notifier)
            await daemon.stop_requested()
            status_updates.cancel_scope.cancel()
        notifier.stopping(f"node {node}: {failure}; stopping" if failure else
                          f"node {node}: stopping, taking its volumes down cleanly")
    return failure
