"""`gateway demo` end to end, run as a user runs it (its output not a terminal): it exits 0 when
the degraded canary was rolled back, and its summary agrees with the gateway's own metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import cache
from typing import Any

from conftest import GATEWAY_BIN

CONCURRENCY = 32  # the demo's traffic driver: requests in flight at most


@cache
def demo_command() -> list[str]:
    """`gateway demo`, or the same through `python -c` while `demo` is not registered yet."""
    probe = subprocess.run(
        [str(GATEWAY_BIN), "demo", "--help"], capture_output=True, text=True, timeout=30
    )
    if probe.returncode == 0:
        return [str(GATEWAY_BIN), "demo"]
    code = "import gateway.cli.demo; from gateway.cli import main; main()"
    return [sys.executable, "-c", code, "demo"]


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*demo_command(), *args], capture_output=True, text=True, timeout=120)


def summary_of(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [x for x in run.stdout.splitlines() if x.startswith("summary-json: ")]
    assert len(lines) == 1, run.stdout + run.stderr
    return json.loads(lines[0].removeprefix("summary-json: "))


def five_xx(codes: dict[str, int]) -> int:
    return sum(n for code, n in codes.items() if code.startswith("5"))


def test_demo_rolls_the_degraded_canary_back_and_its_counts_agree() -> None:
    run = run_demo("--duration", "15", "--seed", "1")
    print(run.stdout[-3000:])
    assert run.returncode == 0, run.stdout + run.stderr
    assert "\x1b[" not in run.stdout  # not a terminal: plain lines, no live view
    r = summary_of(run)
    assert r["ok"] and r["state"] == "rolled_back" and r["store"] == "memory"

    # Per-variant totals: the registry's per-code counts, its per-variant sums, what the users
    # received and the grand totals all agree.
    m = r["metrics"]
    by_code = m["gateway_requests_total"]
    served = {variant: sum(codes.values()) for variant, codes in by_code.items()}
    assert set(served) == {"v1", "v2"} and min(served.values()) > 0
    assert served == m["by_variant"] == r["requests"]["by_variant"]
    assert sum(served.values()) == m["total"] == r["requests"]["total"]
    assert r["requests"]["no_answer"] == 0

    # The rollback: by the guard's SPRT, once, after the degradation, with llr past A.
    rb, canary = r["rollback"], r["canary"]
    assert rb["happened"] and rb["reason"] == "sprt" and rb["actor"] == "guard"
    assert m["gateway_rollbacks_total"] == {"operator": 0.0, "sprt": 1.0}
    assert rb["at_s"] >= canary["degraded_at_s"]
    assert canary["first_error_at_s"] is not None
    assert canary["degraded_at_s"] <= canary["first_error_at_s"] <= rb["at_s"]
    # (at_s and first_error_at_s are rounded to the millisecond)
    assert abs(rb["delay_ms"] - (rb["at_s"] - canary["first_error_at_s"]) * 1000) <= 1.5
    g = rb["guard"]
    assert g["llr"] >= g["A"] and g["k"] >= 3
    assert g["k"] <= rb["canary_errors_before"]  # the guard saw no error the canary never sent
    assert math.isclose(
        g["llr"], g["k"] * math.log(5) + (g["n"] - g["k"]) * math.log(0.95 / 0.99), rel_tol=1e-9
    )

    # Canary requests before the rollback, as the canary itself counted them: at least the 3
    # errors the SPRT needs, and few (30 % of them fail); afterwards only those in flight.
    assert 3 <= rb["canary_errors_before"] <= rb["canary_requests_before"] <= 60
    assert rb["canary_requests_in_flight"] <= CONCURRENCY
    assert (
        rb["canary_requests_before"] + rb["canary_requests_in_flight"]
        == canary["requests_since_degrading"]
    )
    assert canary["requests"] == served["v2"]  # the canary's own count = the gateway's

    # on_canary_error is pass: every canary 500 reached a user, and nothing else failed.
    assert five_xx(by_code["v1"]) == 0
    assert (
        r["requests"]["user_visible_errors"]
        == five_xx(by_code["v2"])
        == canary["errors"]
        == rb["canary_errors_before"] + rb["canary_errors_in_flight"]
    )

    # The shadow: v3 scores 0.05 above its primaries; the paired t-test finds it.
    shadow = r["shadow"]
    assert shadow["shadow"] == "v3" and shadow["metric"] == "json:/score"
    assert shadow["n"] > 100 and shadow["p"] < 1e-6
    assert abs(shadow["mean_diff"] - 0.05) < 0.02
    assert m["gateway_shadow_requests_total"].get("v3/ok", 0) >= shadow["n"]
    assert "higher" in shadow["verdict"]

    assert all(check["ok"] for check in r["checks"]), r["checks"]
    assert "Result: OK" in run.stdout
    assert "rollback  by the guard (sprt)" in run.stdout


def test_demo_exits_1_when_the_canary_is_never_rolled_back() -> None:
    run = run_demo("--duration", "5", "--canary-error-rate", "0", "--seed", "3")
    assert run.returncode == 1, run.stdout + run.stderr
    r = summary_of(run)
    assert not r["ok"] and not r["rollback"]["happened"]
    assert r["state"] == "running" and r["requests"]["user_visible_errors"] == 0
    assert "rollback  none" in run.stdout and "Result: NOT as intended" in run.stdout


def test_demo_refuses_a_degradation_after_the_end() -> None:
    run = run_demo("--duration", "10", "--degrade-after", "12")
    assert run.returncode == 2
    assert "--degrade-after" in run.stderr and "summary-json" not in run.stdout
