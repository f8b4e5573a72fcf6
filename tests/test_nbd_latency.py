"""Option haggling is quick: Nagle off on accepted connections, and listing many exports
(each described with NBD_OPT_INFO, as `nbdinfo --list` does) costs milliseconds per export.

`nbdinfo --list` itself (libnbd 1.14 and upstream) spends ~200 ms per export in the client's
own kernel: it sends NBD_OPT_LIST_META_CONTEXT without queries with MSG_MORE on its last
piece, which the kernel holds until its probe timer fires (nbdkit shows the same). The raw
client below sends every option whole, so what it measures is the server's own latency.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from pathlib import Path

import pytest

from snapship.nbd import protocol as p
from snapship.nbd import server as server_mod
from snapship.nbd.names import ExportNames
from snapship.nbd.server import NbdServer, ServerOptions
from tests.nbdhelp import RawClient, make_test_repo, serve

EXPORTS = 60


def test_accepted_tcp_connections_have_nagle_off(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make_test_repo(tmp_path, [("disk", bytes(70000))])
    seen: list[int] = []
    original = server_mod.Connection.run

    async def recording_run(self: server_mod.Connection) -> None:
        sock = self.writer.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await original(self)

    monkeypatch.setattr(server_mod.Connection, "run", recording_run)
    # asyncio's own default would hide a missing call: switch it off to see ours.
    monkeypatch.setattr("asyncio.base_events._set_nodelay", lambda sock: None)

    async def scenario() -> None:
        server = NbdServer(ExportNames(tr.open(), read_only=True), None, ServerOptions())
        try:
            (host, port), *_ = await server.start("127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(host, port)
            assert len(await reader.readexactly(18)) == 18  # the greeting: accepted
            writer.close()
            await writer.wait_closed()
        finally:
            await server.close()

    asyncio.run(scenario())
    assert seen and all(seen), seen


def test_describing_sixty_exports_one_by_one_takes_under_a_second(tmp_path: Path) -> None:
    volumes = ("alpha", "beta", "gamma")
    images = [(volumes[i % 3], bytes([i + 1]) * 70000) for i in range(EXPORTS - len(volumes))]
    tr = make_test_repo(tmp_path, images)
    with serve(tr.path, log_dir=tmp_path) as server:
        client = RawClient(server.port)
        try:
            client.greet()
            start = time.monotonic()
            assert client.option(p.OPT_STRUCTURED_REPLY) == [(p.REP_ACK, b"")]
            listed = client.option(p.OPT_LIST)
            names = [data[4 : 4 + struct.unpack(">I", data[:4])[0]].decode()
                     for rtype, data in listed if rtype == p.REP_SERVER]
            assert len(names) == EXPORTS
            for name in names:
                raw = struct.pack(">I", len(name)) + name.encode()
                info = client.option(p.OPT_INFO, raw + struct.pack(">HH", 1, p.INFO_DESCRIPTION))
                assert info[-1][0] == p.REP_ACK, (name, info)
                contexts = client.option(p.OPT_LIST_META_CONTEXT, raw + struct.pack(">I", 0))
                assert contexts[-1][0] == p.REP_ACK, (name, contexts)
            elapsed = time.monotonic() - start
        finally:
            client.close()
    # Nagle plus a delayed ACK would cost 40 ms or more per reply written in pieces.
    assert elapsed < 1.0, f"{EXPORTS} exports described in {elapsed:.2f} s"
