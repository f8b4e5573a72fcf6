"""A checkpoint's commit yields the CPUs to serving: its threads (and the engine's workers
they start) run at nice +COMMIT_NICE, checked from inside a commit on the live registry's
commit threads; the server's own threads keep their priority."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from snapship.nbd import live


def nice_of(tid: int) -> int:
    stat = Path(f"/proc/self/task/{tid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])  # field 19, "nice"


def test_commits_run_niced(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def commit() -> None:
        seen["commit_nice"] = nice_of(threading.get_native_id())
        with ThreadPoolExecutor(1) as engine:  # as the engine starts its workers
            seen["worker_nice"] = engine.submit(
                lambda: nice_of(threading.get_native_id())).result()

    async def main() -> None:
        registry = live.LiveRegistry(tmp_path, lambda v, w: None,
                                     lambda image, layer: None)  # type: ignore[arg-type,return-value]
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(registry._commit_pool, commit)
        await registry.drain()

    base = nice_of(threading.get_native_id())
    asyncio.run(main())
    want = min(19, base + live.COMMIT_NICE)
    assert seen == {"commit_nice": want, "worker_nice": want}
    assert nice_of(threading.get_native_id()) == base  # the server's own threads keep theirs
