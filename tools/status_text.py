"""The human form of a volume's status (``gmd status``, the demo's summary).

Pure formatting of the control socket's status JSON: no I/O, no ``gmd``
imports beyond what the JSON already says.
"""

from __future__ import annotations

import time
from typing import Any


def human_bytes(n: int | None) -> str:
    """``n`` bytes in binary units (``1.5 MiB``); ``-`` for unknown."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")



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


def format_status(st: dict[str, Any]) -> str:
    """The human form of one volume's status."""
    if "error" in st:
        return f"{st['volume']} on {st['node']}: cannot read status: {st['error']}"
    source = "daemon" if st.get("daemon") else "daemon not running; from the state map"
    sm = st["state_map"]
    q = st["quorum"]
    lines = [
        f"{st['volume']} on {st['node']}: {st['role']}, mode {st['mode']}, "
        f"{human_bytes(st['size'])} ({source})",
        f"  state map {sm['path']}: "
        f"{'in use' if st.get('daemon') else ('clean' if sm['clean'] else 'NOT clean (recovery at next start)')}, "
        f"generation {sm['generation']}, updated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(sm['updated']))}",
        f"  quorum: {q.get('votes', '?')} votes present, {q['needed']} of {q['expected']} expected needed"
        + (f" (operator override {q['expected_override']})" if q.get("expected_override") else "")
        + ("" if "ok" not in q else (": quorum" if q["ok"] else ": NO QUORUM"))
        + ("; FORCED primary (writes go on without quorum)" if q.get("forced") else "")
        + ("; writing on ALONE (on_quorum_loss = continue)" if q.get("writing_alone") else ""),
    ]
    if q.get("policy_note"):
        lines.append(f"  on quorum loss ({q.get('policy')}): {q['policy_note']}")
    for w, ws in (q.get("witnesses") or {}).items():
        lines.append(f"  witness {w}: " + ("connected" if ws["connected"] else f"unreachable ({ws['reason']})")
                     + (", its votes count here" if ws["granted"] else f", votes not granted ({ws['why']})"))
    tk = st.get("takeover")
    if tk and tk.get("auto_promote"):
        lines.append(f"  automatic takeover: {tk['state']}"
                     + (f"; {tk['fences']} self-fence(s)" if tk.get("fences") else ""))
    for event, cmd in ((tk or {}).get("commands") or {}).items():
        if not cmd.get("ok"):
            lines.append(f"  {event} command FAILED ({cmd.get('error') or 'exit ' + str(cmd.get('rc'))}): "
                         f"{' '.join(cmd.get('argv', []))}")
    if st.get("device"):
        lines.append(f"  device {st['device']}" + (f", loop device {st['loop']}" if st.get("loop") else ""))
    sb = st.get("split_brain") or {}
    if sb.get("resolving_towards"):
        lines.append(f"  resolving a split-brain: this side's changes give way to {sb['resolving_towards']}'s")
    for image in sb.get("saved_images", []):
        lines.append(f"  discarded data saved (read-only): {image} (regions listed in {image}.json)")
    for w in sm.get("warnings", []):
        lines.append(f"  warning: {w}")
    line = test_failover_line(st.get("test_failover"))
    if line:
        lines.append(f"  {line}")
    rows = [("member", "disk", "link", "mode", "out of sync", "note")]
    for name, m in st["members"].items():
        note = ""
        pc = m.get("pending_copy")
        if pc:
            note = f"{pc['kind']} copy pending from {human_bytes(pc['fence'])}"
        cp = m.get("copy")
        if cp:
            eta = f", ETA {cp['eta_s']:.0f} s" if cp.get("eta_s") else ""
            note = (f"{cp['kind']} copy {human_bytes(cp['done_bytes'])} of {human_bytes(cp['total_bytes'])}, "
                    f"{human_bytes(cp['rate_bytes_per_s'])}/s{eta}")
        vf = m.get("verify")
        if vf:
            eta = f", ETA {vf['eta_s']:.0f} s" if vf.get("eta_s") else ""
            note = (note + "; " if note else "") + (
                f"verify {human_bytes(vf['done_bytes'])} of {human_bytes(vf['total_bytes'])}, "
                f"{human_bytes(vf['rate_bytes_per_s'])}/s{eta}, {vf['differing_regions']} differing so far")
        rpo = m.get("rpo")
        if rpo and rpo["bytes"]:
            at_least = "at least " if rpo.get("seconds_lower_bound") else ""
            note = (note + "; " if note else "") + (
                f"RPO {human_bytes(rpo['bytes'])} / {at_least}{rpo['seconds']:.1f} s"
                + (" (ALERT: over the threshold)" if rpo.get("alert") else ""))
        elif m.get("lag_bytes"):
            note = (note + "; " if note else "") + f"lag {human_bytes(m['lag_bytes'])} / {m['lag_seconds']:.1f} s"
        bl = m.get("backlog")
        if bl and bl["waiting_writes"]:
            journal = (f", journal {human_bytes(bl['journal_used_bytes'])} of {human_bytes(bl['journal_limit'])}"
                       if bl.get("journal") else "")
            note = (note + "; " if note else "") + (
                f"{bl['waiting_writes']} writes wait in order ({human_bytes(bl['memory_bytes'])} in memory"
                f"{journal}), oldest {bl['oldest_seconds']:.1f} s")
        elif bl and bl["state"] == "bitmap" and bl.get("dropped_reason") and m.get("out_of_sync_bytes"):
            note = (note + "; " if note else "") + f"write order lost ({bl['dropped_reason']}): bitmap tracking"
        wire = m.get("wire") or {}
        if wire.get("compress") == "zstd" and wire.get("data_bytes"):
            note = (note + "; " if note else "") + (
                f"zstd {wire['data_bytes'] / max(1, wire['wire_bytes']):.1f}:1")
        if wire.get("bandwidth_limit"):
            note = (note + "; " if note else "") + f"limit {human_bytes(wire['bandwidth_limit'])}/s"
        if m.get("behind"):
            note = (note + "; " if note else "") + "async queue overflowed: tracking in bitmap"
        tf = m.get("test_failover") or {}
        if tf.get("active"):
            note = (note + "; " if note else "") + "test failover runs there"
        note = _consistency_note(note, m)
        if m.get("reason") and m["link"] in ("standalone", "disconnected"):
            note = (note + "; " if note else "") + m["reason"]
        rows.append((name, m["disk"], m["link"], m.get("mode") or "", human_bytes(m["out_of_sync_bytes"]), note))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for name, m in st["members"].items():
        lv = m.get("last_verify")
        if lv:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lv["finished"]))
            what = (f"not finished ({lv['skipped']}) after {human_bytes(lv['compared_bytes'])}" if "skipped" in lv
                    else f"{human_bytes(lv['compared_bytes'])} compared, {lv['differing_regions']} differing regions")
            lines.append(f"  last verify of {name}: {when}, {what}")
    return "\n".join(lines)
