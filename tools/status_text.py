"""The human form of a volume's status (``gmd status``, ``--watch``, the demo's summary).

Pure rendering of the control socket's status JSON (gmd/status.py, or the
state map's offline answer, gmd/admin.py): a status dict in, a rich renderable
(:func:`status_view`) or plain text (:func:`format_status`) out. No I/O, no
``gmd`` imports beyond what the JSON already says. Whether colour is used is
the caller's choice (:func:`wants_colour`); the plain text has no escape codes.

The view: a header (volume, node, role, mode, size, quorum), a table of the
members, a progress bar per running copy, merge or verify, the members' notes,
and under a bad state what to do next (:func:`next_steps`).
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

#: Width of the plain text (logs, the demo, a pipe): wide enough that a
#: member's row stays on one line.
PLAIN_WIDTH = 120

# Colours of the states users look for: green all is well, yellow on its way
# (or out of sight), red needs a person.
GOOD, BUSY, BAD, QUIET = "green", "yellow", "bold red", "dim"
DISK_STYLE = {"uptodate": GOOD, "outdated": BUSY, "copying": BUSY, "merging": BUSY,
              "inconsistent": BAD, "failed": BAD, "unknown": QUIET}
LINK_STYLE = {"local": GOOD, "connected": GOOD, "connecting": BUSY, "disconnected": BUSY,
              "standalone": BAD, "unknown": QUIET}
REPLICATION_STYLE = {"shipping": GOOD, "catching-up": BUSY, "behind": BUSY}
PASS_LABEL = {"full": "full copy", "merge": "merge", "mini": "mini-copy", "verify": "verify"}


def human_bytes(n: int | None) -> str:
    """``n`` bytes in binary units (``1.5 MiB``); ``-`` for unknown."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float | None) -> str:
    """A duration as people read an ETA: ``42 s``, ``3 min 05 s``, ``2 h 10 min``; ``-`` for unknown."""
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def wants_colour(is_terminal: bool, environ: Mapping[str, str]) -> bool:
    """Colour only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    return is_terminal and not environ.get("NO_COLOR")


# ------------------------------------------------------------- next steps


@dataclass(frozen=True)
class NextStep:
    """A bad state of the volume and what the operator can do about it."""

    state: str  # what is wrong, e.g. "labor2 standalone: split-brain"
    advice: str  # what to run (each command in single quotes, as the CLI's messages quote them) or check
    severity: str = "bad"  # "bad" (red) or "warn" (yellow)


def next_steps(st: dict[str, Any], *, daemon_reachable: bool | None = None) -> list[NextStep]:
    """What to do about each bad state the status shows, most urgent first.

    ``daemon_reachable`` tells an offline status (``"daemon": false``) of a
    daemon that answered but has the volume down from one that is not
    running; the status JSON itself cannot say which.
    """
    if "error" in st:
        return []
    vol, node = st["volume"], st["node"]
    members: dict[str, Any] = st.get("members") or {}
    peers = {n: m for n, m in members.items() if n != node}
    q = st.get("quorum") or {}
    steps: list[NextStep] = []
    if not st.get("daemon"):
        if daemon_reachable:
            steps.append(NextStep(f"{vol} is down on {node}", f"bring it up: 'gmd up {vol}'"))
        else:
            steps.append(NextStep(f"daemon not running on {node}",
                                  f"start it: 'gmd daemon --node {node}' (or the service unit that runs it), "
                                  f"then 'gmd up {vol}'"))
    resolving = (st.get("split_brain") or {}).get("resolving_towards")
    for name, m in peers.items():
        if m.get("link") == "standalone" and (m.get("reason") or "").startswith("split-brain") and not resolving:
            steps.append(NextStep(
                f"{name} standalone: split-brain",
                f"on the side whose changes should go: 'gmd resolve {vol} --discard-local --dry-run' "
                "shows the plan; without --dry-run it discards them (saved to an image first)"))
    if q.get("ok") is False:
        votes = q.get("votes") or 0
        away = [n for n, m in peers.items() if m.get("link") not in ("connected", "local")]
        away += [f"witness {w}" for w, ws in (q.get("witnesses") or {}).items() if not ws.get("granted")]
        suspended = ", writes suspended" if q.get("suspended_writes_since") is not None else ""
        steps.append(NextStep(
            f"no quorum{suspended}: {votes} votes present, {q.get('needed')} needed",
            (f"not here: {', '.join(away)}; bring them back. " if away else "")
            + f"Only after a site is lost for good: 'gmd quorum {vol} --expected-votes {max(votes, 1)}'"))
    local = members.get(node) or {}
    if (local.get("disk") == "inconsistent" and not local.get("pending_copy")
            and not any(m.get("disk") == "uptodate" for m in members.values())):
        steps.append(NextStep(
            f"{node} inconsistent and no member uptodate to copy from",
            f"on the node whose data is to be kept: 'gmd dirty {vol}'; on the others: 'gmd clean {vol}'"))
    primary = st.get("role") == "primary"
    for name, m in peers.items():
        rpo = m.get("rpo") or {}
        if rpo.get("alert"):
            steps.append(NextStep(
                f"{name} RPO over the alert threshold: {_rpo_text(rpo)}",
                f"a disaster now would lose that much; check its link ('gmd status {vol} --json': "
                f"members.{name}.wire and .backlog); it catches up by itself once the link keeps up",
                "warn"))
        if m.get("link") in ("disconnected", "connecting", "unknown") and st.get("daemon"):
            steps.append(NextStep(
                f"{name} {m['link']}",
                f"its writes are marked here and copied when it is back; is its daemon running and "
                f"{vol} up there ('gmd up {vol}' on {name})?", "warn"))
        # A connected member still marked out of sync with no copy going
        # (e.g. after a verify found differences) waits for an operator's resync;
        # a member that fell behind ("behind") gets its mini-copy by itself.
        if (primary and m.get("link") == "connected" and m.get("out_of_sync_bytes")
                and not m.get("copy") and not m.get("verify") and not m.get("pending_copy")
                and m.get("replication") in ("shipping", None)):
            lv = m.get("last_verify") or {}
            what = (f"verify found {lv['differing_regions']} differing regions on {name}"
                    if lv.get("differing_regions") else f"{name} out of sync")
            steps.append(NextStep(f"{what} ({human_bytes(m['out_of_sync_bytes'])} marked)",
                                  f"copy them: 'gmd resync {vol}'", "warn"))
    return steps


# ------------------------------------------------------------------ pieces


def _consistency_note(note: str, m: dict[str, Any]) -> str:
    """The member's consistency in its row: said only when it is worth a
    look (out of write order, an undo log in use, a catch-up refused)."""
    c = m.get("consistency") or {}  # the local member's own view
    consistent = c.get("consistent", m.get("consistent"))
    at = c.get("consistent_at", m.get("consistent_at"))
    undo = c.get("undo_log") or {}
    parts = []
    if consistent is False and m.get("disk") in ("outdated", "merging"):
        parts.append("NOT consistent (catching up without an undo log)")
    elif undo.get("active") or (consistent and c.get("catching_up")):
        parts.append(f"consistent at {at} (undo log {human_bytes(undo.get('used'))} of "
                     f"{human_bytes(undo.get('size'))})")
    elif consistent and m.get("disk") not in ("uptodate", None) and at:
        parts.append(f"consistent at {at}")
    if m.get("catch_up_refused"):
        parts.append(f"catch-up refused: {m['catch_up_refused']}")
    return "; ".join([note, *parts] if note else parts)


def test_failover_line(tf: dict[str, Any] | None) -> str | None:
    """The one line of this member's test failover: running (image, space),
    or how the last one ended; None when there is nothing to say."""
    if not tf:
        return None
    if tf.get("active"):
        loop = f", loop {tf['loop']}" if tf.get("loop") else ""
        return (f"test failover: image {tf['image']}{loop} as of {tf['consistent_at']}; kept "
                f"{human_bytes(tf['kept_bytes'])} + written {human_bytes(tf['overlay_bytes'])} of "
                f"{human_bytes(tf['space'])}")
    if tf.get("ended_reason"):
        return f"last test failover ended: {tf['ended_reason']}"
    return None


def _rpo_text(rpo: dict[str, Any]) -> str:
    at_least = "at least " if rpo.get("seconds_lower_bound") else ""
    return f"{human_bytes(rpo['bytes'])} / {at_least}{rpo['seconds']:.1f} s"


def _member_note(m: dict[str, Any]) -> str:
    """What a member's row cannot say in a column: backlog, wire, consistency, why its link is down."""
    parts = []
    pc = m.get("pending_copy")
    if pc and not m.get("copy"):
        parts.append(f"{pc['kind']} copy pending from {human_bytes(pc['fence'])}")
    bl = m.get("backlog")
    if bl and bl["waiting_writes"]:
        journal = (f", journal {human_bytes(bl['journal_used_bytes'])} of {human_bytes(bl['journal_limit'])}"
                   if bl.get("journal") else "")
        parts.append(f"{bl['waiting_writes']} writes wait in order ({human_bytes(bl['memory_bytes'])} in memory"
                     f"{journal}), oldest {bl['oldest_seconds']:.1f} s")
    elif bl and bl["state"] == "bitmap" and bl.get("dropped_reason") and m.get("out_of_sync_bytes"):
        parts.append(f"write order lost ({bl['dropped_reason']}): bitmap tracking")
    wire = m.get("wire") or {}
    if wire.get("compress") == "zstd" and wire.get("data_bytes"):
        parts.append(f"zstd {wire['data_bytes'] / max(1, wire['wire_bytes']):.1f}:1")
    if wire.get("bandwidth_limit"):
        parts.append(f"limit {human_bytes(wire['bandwidth_limit'])}/s")
    if m.get("behind"):
        parts.append("async queue overflowed: tracking in bitmap")
    if (m.get("test_failover") or {}).get("active"):
        parts.append("test failover runs there")
    note = _consistency_note("; ".join(parts), m)
    if m.get("reason") and m.get("link") in ("standalone", "disconnected", "connecting"):
        note = (note + "; " if note else "") + m["reason"]
    return note


def _styled(value: str | None, styles: dict[str, str]) -> Text:
    value = value or "-"
    return Text(value, style=styles.get(value, ""))


def _header(st: dict[str, Any]) -> list[Text]:
    source = "daemon" if st.get("daemon") else "daemon not running; from the state map"
    sm = st["state_map"]
    q = st["quorum"]
    role = st["role"]
    lines = [Text.assemble(
        (st["volume"], "bold"), f" on {st['node']}: ", (role, "bold" if role == "primary" else ""),
        f", mode {st['mode']}, {human_bytes(st['size'])} ({source})")]
    state = ("in use" if st.get("daemon") else
             ("clean" if sm["clean"] else "NOT clean (recovery at next start)"))
    lines.append(Text(
        f"  state map {sm['path']}: {state}, generation {sm['generation']}, updated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(sm['updated']))}"))
    verdict: tuple[str, str] | str = ""
    if "ok" in q and q["ok"] is not None:
        verdict = (": quorum", GOOD) if q["ok"] else (": NO QUORUM", BAD)
    lines.append(Text.assemble(
        f"  quorum: {q.get('votes') if q.get('votes') is not None else '?'} votes present, "
        f"{q['needed']} of {q['expected']} expected needed"
        + (f" (operator override {q['expected_override']})" if q.get("expected_override") else ""),
        verdict,
        ("; FORCED primary (writes go on without quorum)", BAD) if q.get("forced") else "",
        ("; writing on ALONE (on_quorum_loss = continue)", BAD) if q.get("writing_alone") else ""))
    if q.get("policy_note"):  # the quorum policy's trade-off, when the volume's policy has one
        lines.append(Text(f"  on quorum loss ({q.get('policy')}): {q['policy_note']}", style=BUSY))
    for w, ws in (q.get("witnesses") or {}).items():
        lines.append(Text.assemble(
            f"  witness {w}: ",
            ("connected", GOOD) if ws["connected"] else (f"unreachable ({ws['reason']})", BUSY),
            ", its votes count here" if ws["granted"] else f", votes not granted ({ws['why']})"))
    tk = st.get("takeover")
    if tk and tk.get("auto_promote"):
        lines.append(Text(f"  automatic takeover: {tk['state']}"
                          + (f"; {tk['fences']} self-fence(s)" if tk.get("fences") else "")))
    for event, cmd in ((tk or {}).get("commands") or {}).items():
        if not cmd.get("ok"):
            lines.append(Text(f"  {event} command FAILED ({cmd.get('error') or 'exit ' + str(cmd.get('rc'))}): "
                              f"{' '.join(cmd.get('argv', []))}", style=BAD))
    if st.get("device"):
        lines.append(Text(f"  device {st['device']}" + (f", loop device {st['loop']}" if st.get("loop") else "")))
    sb = st.get("split_brain") or {}
    if sb.get("resolving_towards"):
        lines.append(Text(f"  resolving a split-brain: this side's changes give way to "
                          f"{sb['resolving_towards']}'s", style=BUSY))
    for image in sb.get("saved_images", []):
        lines.append(Text(f"  discarded data saved (read-only): {image} (regions listed in {image}.json)"))
    for w in sm.get("warnings", []):
        lines.append(Text(f"  warning: {w}", style=BUSY))
    line = test_failover_line(st.get("test_failover"))
    if line:
        lines.append(Text(f"  {line}"))
    return lines


def _members_table(st: dict[str, Any], width: int) -> tuple[Table, dict[str, str]]:
    """One row per member, and what did not fit: a column nobody has a value
    in (lag of sync members, paths offline) is left out, and on a terminal too
    narrow for lag and RPO they go to the member's note instead."""
    columns = ("member", "role", "mode", "disk", "link", "replication", "paths", "out of sync", "lag", "RPO")
    rows = []
    for name, m in st["members"].items():
        local = m.get("link") == "local"
        oos = m.get("out_of_sync_bytes")
        lag = (f"{human_bytes(m['lag_bytes'])} / {m['lag_seconds']:.1f} s" if m.get("lag_bytes") else "-")
        rpo = m.get("rpo") or {}
        rpo_cell = (Text(_rpo_text(rpo) + (" ALERT" if rpo.get("alert") else ""), style=BAD if rpo.get("alert")
                         else "") if rpo.get("bytes") else Text("-"))
        rows.append((name, (
            Text(name, style="bold" if local else ""),
            Text(st["role"] if local else (m.get("peer_role") or "-")),
            Text(m.get("mode") or "-"),
            _styled(m.get("disk"), DISK_STYLE),
            _styled(m.get("link"), LINK_STYLE),
            _styled(m.get("replication"), REPLICATION_STYLE),
            Text("-" if local or m.get("paths") is None else str(m["paths"])),
            Text(human_bytes(oos), style=BUSY if oos else ""),
            Text(lag), rpo_cell)))
    keep = [i for i in range(len(columns)) if i < 6 or any(r[i].plain != "-" for _, r in rows)]
    wide = {i: max([len(columns[i])] + [len(r[i].plain) for _, r in rows]) for i in keep}
    moved: dict[str, str] = {}
    if 2 + sum(wide.values()) + 2 * (len(keep) - 1) > width:
        for name, r in rows:
            said = [f"{columns[i]} {r[i].plain}" for i in keep if i in (6, 8, 9) and r[i].plain != "-"]
            if said:
                moved[name] = "; ".join(said)
        keep = [i for i in keep if i not in (6, 8, 9)]
    table = Table(box=None, pad_edge=False, padding=(0, 0, 0, 2), header_style="bold", show_edge=False)
    for i in keep:
        table.add_column(columns[i], no_wrap=True, justify="right" if columns[i] in ("paths", "out of sync") else "left")
    for _, r in rows:
        table.add_row(*(r[i] for i in keep))
    return table, moved


def _bar(done: int, total: int, colour: bool, width: int) -> RenderableType:
    if colour:
        return ProgressBar(total=max(total, 1), completed=done, width=width, complete_style=BUSY,
                           finished_style=GOOD)
    filled = (width - 2) * done // max(total, 1)
    return Text("[" + "#" * filled + "." * (width - 2 - filled) + "]")


def _passes(st: dict[str, Any], colour: bool, width: int) -> RenderableType | None:
    """A bar per running copy, merge or verify: done of total, rate, ETA. The
    figures keep their width; the bar takes what is left, 10 to 30 wide."""
    cells = []
    for name, m in st["members"].items():
        for p in (m.get("copy"), m.get("verify")):
            if not p:
                continue
            done, total = p["done_bytes"], p["total_bytes"]
            label = PASS_LABEL.get(p["kind"], p["kind"])
            cells.append((
                p, f"  {label} {'of' if p['kind'] == 'verify' else 'to'} {name}",
                f"{human_bytes(done)} of {human_bytes(total)}",
                f"{100 * done // max(total, 1)}%",
                f"{human_bytes(p['rate_bytes_per_s'])}/s",
                f"ETA {human_seconds(p.get('eta_s'))}",
                f"{p['differing_regions']} differing so far" if "differing_regions" in p else ""))
    if not cells:
        return None
    if not any(c[-1] for c in cells):  # no verify: no column for its differences
        cells = [c[:-1] for c in cells]
    widths = [max(len(c[i]) for c in cells) for i in range(1, len(cells[0]))]
    bar_width = min(30, width - sum(widths) - 2 * len(widths))
    if bar_width < 8:  # a narrow terminal: the bar on one line, its figures on the next
        lines: list[RenderableType] = []
        for p, label, *figures in cells:
            row = Table.grid(padding=(0, 0, 0, 2), pad_edge=False)
            row.add_row(label, _bar(p["done_bytes"], p["total_bytes"], colour,
                                    max(8, min(30, width - widths[0] - 3))))
            lines += [row, Text("    " + "  ".join(f for f in figures if f))]
        return Group(*lines)
    grid = Table.grid(padding=(0, 0, 0, 2), pad_edge=False)
    for _ in range(len(widths) + 1):
        grid.add_column(no_wrap=True)
    for p, label, *figures in cells:
        grid.add_row(label, _bar(p["done_bytes"], p["total_bytes"], colour, bar_width), *figures)
    return grid


def status_view(st: dict[str, Any], *, colour: bool = False, width: int = PLAIN_WIDTH,
                daemon_reachable: bool | None = None) -> RenderableType:
    """One volume's status as a rich renderable: header, members, progress
    bars, notes, next steps. ``colour`` picks rich's bars over ASCII ones; the
    console it is printed on decides whether any style reaches the output."""
    if "error" in st:
        return Text(f"{st['volume']} on {st['node']}: cannot read status: {st['error']}", style=BAD)
    table, moved = _members_table(st, width)
    parts: list[RenderableType] = [*_header(st), Padding(table, (0, 0, 0, 2))]
    bars = _passes(st, colour, width)
    if bars is not None:
        parts.append(bars)
    for name, m in st["members"].items():
        note = "; ".join(n for n in (moved.get(name), _member_note(m)) if n)
        if note:
            parts.append(Text(f"  {name}: {note}"))
        lv = m.get("last_verify")
        if lv:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lv["finished"]))
            what = (f"not finished ({lv['skipped']}) after {human_bytes(lv['compared_bytes'])}" if "skipped" in lv
                    else f"{human_bytes(lv['compared_bytes'])} compared, {lv['differing_regions']} differing regions")
            parts.append(Text(f"  last verify of {name}: {when}, {what}"))
    for step in next_steps(st, daemon_reachable=daemon_reachable):
        parts.append(Text(f"  ! {step.state}", style=BAD if step.severity == "bad" else BUSY))
        parts.append(Text.assemble("    -> ", (step.advice, "bold")))
    return Group(*parts)


def render_plain(renderable: RenderableType, width: int = PLAIN_WIDTH) -> str:
    """A renderable as plain text, no escape codes (logs, pipes, NO_COLOR)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False, no_color=True,
            highlight=False, emoji=False, legacy_windows=False, soft_wrap=True).print(renderable)
    return "\n".join(line.rstrip() for line in out.getvalue().rstrip("\n").splitlines())


def format_status(st: dict[str, Any], *, width: int = PLAIN_WIDTH, daemon_reachable: bool | None = None) -> str:
    """The plain-text form of one volume's status (the demo, logs, a pipe)."""
    return render_plain(status_view(st, colour=False, width=width, daemon_reachable=daemon_reachable), width)
