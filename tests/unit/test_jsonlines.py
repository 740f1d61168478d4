"""transport.jsonlines: the shared control-socket machinery, on a real Unix socket."""

from __future__ import annotations

import errno
import os
import socket
import stat

import pytest
import trio
import trio.testing

from transport import jsonlines


async def _echo_server(path, *, task_status=trio.TASK_STATUS_IGNORED):
    """Answers each request line with {"echo": request}."""
    listener = await jsonlines.open_listener(path, 4)

    async def client(stream):
        async with stream:
            reader = jsonlines.LineReader(stream, 1 << 16)
            while (line := await reader.next_line()) is not None:
                await stream.send_all(jsonlines.encode({"echo": line.decode()}))

    task_status.started()
    await trio.serve_listeners(client, [listener])


async def test_both_clients_get_the_reply_and_the_socket_is_0600(tmp_path):
    path = tmp_path / "ctl.sock"
    async with trio.open_nursery() as n:
        await n.start(_echo_server, path)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert await jsonlines.request_async(path, {"op": "x"}, timeout=10, max_reply=1024) == {"echo": '{"op": "x"}'}
        reply = await trio.to_thread.run_sync(
            lambda: jsonlines.request(path, [1], timeout=10, max_reply=1024))
        assert reply == {"echo": "[1]"}
        with pytest.raises(jsonlines.NoReply):
            await jsonlines.request_async(path, "x" * 2000, timeout=10, max_reply=16)
        n.cancel_scope.cancel()


async def test_a_line_over_the_limit_is_refused():
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"a" * 100)
    with pytest.raises(jsonlines.LineTooLong):
        await jsonlines.LineReader(right, 10).next_line()


async def test_no_server_and_a_stale_socket(tmp_path):
    path = tmp_path / "ctl.sock"
    with pytest.raises(FileNotFoundError):
        await jsonlines.request_async(path, {}, timeout=5, max_reply=1024)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, nobody listens: what a killed process leaves
    jsonlines.prepare_socket_path(path)
    assert not path.exists()
    path.write_text("not a socket")
    with pytest.raises(OSError) as e:
        jsonlines.prepare_socket_path(path)
    assert e.value.errno == errno.EEXIST
