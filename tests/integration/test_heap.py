"""A served gateway freezes its start-up heap, and scipy's once the shadow tests load it
(gateway/heap.py): full collections then walk only what came later. Young collections run
less often than CPython's default.

Run in a child interpreter: freezing is per process, and the test process's heap is not ours
to freeze. The child serves a real gateway with `serve_gateway` (uvicorn, memory store, a flag
with a shadow so the statistics are preloaded) and reports what the collector saw.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

from conftest import flag_doc, free_port

from gateway.heap import YOUNG_THRESHOLD

CHILD = """
import asyncio, gc, json, os, signal, sys
from gateway.app import create_app
from gateway.server import serve_gateway
from gateway.settings import Settings

settings = Settings.model_validate(json.loads(sys.argv[1]))
gateway = create_app(settings)
seen = {}

async def watch():
    while gc.get_freeze_count() == 0:
        await asyncio.sleep(0.005)
    seen["after_startup"] = gc.get_freeze_count()
    seen["threshold"] = gc.get_threshold()
    seen["scipy_loaded_at_startup"] = "scipy.stats" in sys.modules
    preloaded = asyncio.get_running_loop().create_future()
    freeze = gateway.after_preload

    def after_preload():
        freeze()
        preloaded.set_result(gc.get_freeze_count())

    gateway.after_preload = after_preload
    seen["after_preload"] = await preloaded
    gc.collect()
    seen["tracked_after_full_collection"] = len(gc.get_objects())
    os.kill(os.getpid(), signal.SIGTERM)

async def main():
    task = asyncio.get_running_loop().create_task(watch())
    await asyncio.wait_for(serve_gateway(gateway), timeout=30)
    await task

asyncio.run(main())
print(json.dumps(seen))
"""


def test_serving_freezes_the_startup_heap_and_the_preloaded_statistics(tmp_path: Path) -> None:
    flags = flag_doc("http://127.0.0.1:9", None)
    flags["flags"][0]["shadows"] = [{"name": "v3", "upstream": "http://127.0.0.1:9"}]
    flags_file = tmp_path / "flags.json"
    flags_file.write_text(json.dumps(flags))
    settings = {
        "listen": {"host": "127.0.0.1", "port": free_port()},
        "admin": {"host": "127.0.0.1", "port": free_port()},
        "store": {"flags_file": str(flags_file)},
    }
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Start-up alone leaves tens of thousands of objects (pydantic, uvicorn, prometheus-client).
    assert seen["after_startup"] > 20_000, seen
    assert not seen["scipy_loaded_at_startup"], seen
    # Young collections are rarer than CPython's default; the older generations keep theirs.
    assert seen["threshold"] == [YOUNG_THRESHOLD, *gc.get_threshold()[1:]], seen
    # scipy.stats adds tens of thousands more, frozen once the preload is done.
    assert seen["after_preload"] > seen["after_startup"] + 10_000, seen
    # What a full collection still walks is what came after, not the process's whole life.
    assert seen["tracked_after_full_collection"] < seen["after_preload"] // 10, seen
