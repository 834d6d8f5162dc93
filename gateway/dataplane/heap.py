"""Keeps Python's garbage collector out of the request path's tail latency.

A full collection walks every object the collector tracks, with the event loop stopped: every
request in flight waits for it. The objects alive once the gateway has started (pydantic
models, uvicorn, prometheus-client, scipy for the shadow tests) live as long as the process,
and the request path makes no cyclic garbage (reference counting frees all it allocates;
tests/integration/test_heap.py), so they are moved out of the collector's sight (`gc.freeze`):
later collections walk only what came after. Reference counting still frees frozen objects;
only a cycle among them would stay, once.

Young collections are made rarer too. A request allocates a few hundred container objects,
nearly all freed by reference counting, so at CPython's default threshold of 700 a young
collection would run every few requests and walk what the requests in flight hold. At
`YOUNG_THRESHOLD` it runs a tenth as often, and walks at most that many objects when it does.
(What this saves is measured in bench/RESULTS.md.)
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7_000


def freeze_after_startup() -> None:
    """Before serving: collect start-up's garbage, freeze what is left, and collect the young
    generation less often."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)


def freeze_after_load() -> None:
    """After a heavy import while serving: freeze without a full collection, which would
    stop the loop for the very pause this avoids. The import's own garbage (if any) stays."""
    gc.freeze()
