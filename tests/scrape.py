"""Reading one sample from a running gateway's `/metrics` on its admin port."""

from __future__ import annotations

from typing import Any

import httpx


def metric(gw: Any, name: str, **labels: str) -> float:
    """The value of one exposed sample, its labels in any order (0.0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    sample = f"{name}{{{wanted}}}" if labels else name
    for line in httpx.get(f"{gw.admin_url}/metrics").text.splitlines():
        exposed, _, value = line.rpartition(" ")
        if exposed == sample:
            return float(value)
    return 0.0
