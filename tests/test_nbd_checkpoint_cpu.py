"""A checkpoint's commit yields the CPUs to serving: its threads (and the engine's workers
they start) run at nice +COMMIT_NICE, and while any commit runs the GIL switch interval is
short: checked from inside a commit on the live registry's commit threads."""

from __future__ import annotations

import asyncio
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from snapship.nbd import live


def nice_of(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19, "nice"


def test_commits_run_niced_with_short_switches(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def commit() -> None:
        seen["commit_nice"] = nice_of(threading.get_native_id())
        seen["switch"] = sys.getswitchinterval()
        with ThreadPoolExecutor(1) as engine:  # as the engine starts its workers
            seen["worker_nice"] = engine.submit(
                lambda: nice_of(threading.get_native_id())).result()

    async def main() -> None:
        registry = live.LiveRegistry(tmp_path, lambda v, w: None,
                                     lambda image, layer: None)  # type: ignore[arg-type,return-value]
        loop = asyncio.get_running_loop()
        with live.short_switches():
            await loop.run_in_executor(registry._commit_pool, commit)
        await registry.drain()

    default = sys.getswitchinterval()
    base = nice_of(threading.get_native_id())
    asyncio.run(main())
    want = min(19, base + live.COMMIT_NICE)
    assert seen == {"commit_nice": want, "worker_nice": want, "switch": live.SWITCH_INTERVAL}
    assert sys.getswitchinterval() == default  # back once no commit runs
    assert nice_of(threading.get_native_id()) == base  # the server's own threads keep theirs


def test_short_switches_nest_and_restore() -> None:
    default = sys.getswitchinterval()
    with live.short_switches():
        with live.short_switches():
            assert sys.getswitchinterval() == live.SWITCH_INTERVAL
        assert sys.getswitchinterval() == live.SWITCH_INTERVAL  # one commit still runs
    assert sys.getswitchinterval() == default
