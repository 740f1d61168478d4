"""Running an administrator's command from the daemon: the volume's start
and stop commands (:mod:`gmd.takeover`) and its hooks (:mod:`gmd.hooks`).

A command runs in its own session and process group with no input; its
output is read (the first :data:`OUTPUT_LIMIT` bytes kept, the rest read and
dropped, so a chatty command never blocks on a full pipe), and when it runs
past its limit its whole process group is killed. Failure to start, a
non-zero exit and a timeout are results, never exceptions: what the daemon
does next never depends on an administrator's script (quorum protects data).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

import trio

OUTPUT_LIMIT = 64 * 1024  # bytes of a command's output kept for the log and status; the rest is read and dropped


async def run_command(argv: Sequence[str], env: Mapping[str, str], limit: float) -> dict[str, Any]:
    """Run ``argv`` with ``env`` for at most ``limit`` seconds; return how it
    ended: ``ok``, ``rc`` (None if it never ran), ``seconds``, ``output``
    (its last 2000 characters), ``error`` (why it failed to run or was
    killed, else None), ``at`` (wall time it started) and ``argv``."""
    started, t0 = time.time(), trio.current_time()
    result: dict[str, Any] = {"at": started, "argv": list(argv)}
    output = bytearray()
    try:
        proc = await trio.lowlevel.open_process(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT, env=dict(env), start_new_session=True)
    except OSError as e:
        result.update(ok=False, rc=None, error=f"cannot run it: {e}", seconds=0.0, output="")
        return result
    timed_out = False
    try:
        with trio.move_on_after(limit) as scope:
            async with proc.stdout:
                while chunk := await proc.stdout.receive_some(65536):
                    if len(output) < OUTPUT_LIMIT:
                        output += chunk[:OUTPUT_LIMIT - len(output)]
            await proc.wait()
        timed_out = scope.cancelled_caught
    finally:
        if proc.returncode is None:
            kill_group(proc.pid)
            with trio.CancelScope(shield=True):
                await proc.wait()
    text = output.decode(errors="replace").strip()
    result.update(ok=proc.returncode == 0 and not timed_out, rc=proc.returncode,
                  seconds=round(trio.current_time() - t0, 3), output=text[-2000:],
                  error=f"killed after {limit:.1f} s" if timed_out else None)
    return result


def kill_group(pid: int) -> None:
    """SIGKILL the process group ``pid`` leads (gone already: nothing to do)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
