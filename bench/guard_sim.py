"""How fast and how honestly the guard rolls back, against Flagger- and Argo-style checks.

Traffic: canary responses arrive as a Poisson process at `rate` per second; each is an error with
probability 0.005 until the change at t = 10 min and 0.05 after it. Errors and clean responses
are then independent Poisson processes (thinning), so a run is drawn as its error times plus
Poisson counts of clean responses between consecutive errors and minute boundaries: exact, and
small enough to simulate hours of 200 req/s. One model per detector, each in one sentence:

- guard: every canary response is judged by `gateway.core.sprt.step` (e0 = 0.01, e1 = 0.05,
  alpha = 0.01, beta = 0.10); ACCEPT restarts the counts at zero, REJECT rolls back.
- Flagger-style: every minute the canary's error rate over that minute fails the check when it
  exceeds 5 % (success rate below 95 %); failed checks accumulate (a passing check does not reset
  them) and the tick after the 3rd failure rolls back (`threshold: 3`; the scheduler compares
  FailedChecks >= threshold before it runs the next analysis).
- Argo-style: every 5 minutes from t = 5 min the error rate over the last 5 minutes fails the
  measurement when it exceeds 5 %, and the AnalysisRun fails (rollback) when failed measurements
  exceed `failureLimit: 3`, i.e. on the 4th.

After a rollback each detector starts again from nothing (a redeploy), so a long healthy run
yields a rate of false rollbacks. Checks are aligned with the change (it falls on a tick), which
is the best case for the fixed-interval tools.

Usage: .venv/bin/python bench/guard_sim.py [--seed N] [--runs R] [--days D] [--out PATH]
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).parent))  # the sibling module below, however this is run
import guard_rollout

from gateway.core.sprt import Decision, SprtBounds, SprtCounts, step, wald_rejection_bound

GUARD = SprtBounds(e0=0.01, e1=0.05, alpha=0.01, beta=0.10)
OLD_A = wald_rejection_bound(GUARD.alpha, GUARD.beta)  # the single bound of the old design
RATES = (20, 200)  # canary requests per second
E_HEALTHY = 0.005
E_BROKEN = 0.05
CHANGE_MIN = 10  # the canary breaks at t = 10 min
AFTER_MIN = 180  # simulated time after the change; every detector fires well before it
DAY_MIN = 24 * 60

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FixedCheck:
    """A threshold check on the canary's error rate over each window of `minutes`."""

    name: str
    minutes: int  # window length and interval between checks
    fires_at: int  # failed checks (since the last rollback) that trigger a rollback
    delay: int  # checks between the firing failure and the rollback
    max_error_percent: int = 5  # a check fails when the error rate is above this


FLAGGER = FixedCheck("Flagger-style", minutes=1, fires_at=3, delay=1)
ARGO = FixedCheck("Argo-style", minutes=5, fires_at=4, delay=0)
CHECKS = (FLAGGER, ARGO)


@dataclass(frozen=True, slots=True)
class Traffic:
    """One simulated canary: its errors and the requests served up to each minute boundary."""

    error_times: Floats  # seconds, sorted
    gaps: Ints  # clean responses between the previous error (or the start) and each error
    error_ordinals: Ints  # 1-based position of each error among all requests
    served_before: Ints  # requests served before minute m, for m = 0 .. minutes
    errors_before: Ints  # errors before minute m


@dataclass(frozen=True, slots=True)
class Rollbacks:
    """When a detector rolled back, and how many requests the canary had served by then."""

    times: Floats  # seconds
    served: Ints  # requests served up to and including the rollback moment


def poisson_times(rng: np.random.Generator, rate: float, start: float, end: float) -> Floats:
    """The sorted event times of a Poisson process of `rate` on [start, end)."""
    return np.sort(rng.uniform(start, end, rng.poisson(rate * (end - start))))


def draw_traffic(
    rng: np.random.Generator,
    rate: float,
    *,
    minutes: int,
    change_min: int,
    errors: tuple[float, float],
) -> Traffic:
    """A run of `minutes`: error rate errors[0] before `change_min`, errors[1] from then on."""
    change, (before, after) = 60.0 * change_min, errors
    error_times = np.concatenate(
        [
            poisson_times(rng, rate * before, 0.0, change),
            poisson_times(rng, rate * after, change, 60.0 * minutes),
        ]
    )
    grid = 60.0 * np.arange(minutes + 1)
    cuts = np.union1d(grid, error_times)  # an error lands on a grid point with probability 0
    clean_rate = rate * (1 - np.where(cuts[:-1] < change, before, after))
    clean = rng.poisson(clean_rate * np.diff(cuts))
    clean_before = np.concatenate([[0], np.cumsum(clean)])
    at_error = clean_before[np.searchsorted(cuts, error_times)]
    errors_before = np.searchsorted(error_times, grid)
    return Traffic(
        error_times=error_times,
        gaps=np.diff(at_error, prepend=0),
        error_ordinals=at_error + np.arange(1, error_times.size + 1),
        served_before=clean_before[np.searchsorted(cuts, grid)] + errors_before,
        errors_before=errors_before,
    )


def successes_to_accept(bounds: SprtBounds, counts: SprtCounts) -> int:
    """How many clean responses from `counts` make the test ACCEPT (exactly, by `decide`)."""
    drop = -bounds.log_success_ratio
    s = max(1, math.ceil((bounds.llr(counts.n, counts.k) - bounds.B) / drop))
    while s > 1 and bounds.decide(counts.n + s - 1, counts.k) is Decision.ACCEPT:
        s -= 1  # float rounding in the estimate above
    while bounds.decide(counts.n + s, counts.k) is not Decision.ACCEPT:
        s += 1
    return s


def skip_clean(
    bounds: SprtBounds, counts: SprtCounts, clean: int, fresh: int
) -> tuple[SprtCounts, int]:
    """The counts after `clean` clean responses, and how many ACCEPTs (restarts) they caused.

    A clean response only lowers the llr, so it can ACCEPT but never REJECT; after the first
    ACCEPT the test restarts at zero and accepts again every `fresh` clean responses.
    """
    # With no error counted, (n, 0) is a fresh test n clean responses in.
    first = fresh - counts.n if counts.k == 0 else successes_to_accept(bounds, counts)
    if clean < first:
        return SprtCounts(counts.n + clean, counts.k), 0
    rest = clean - first
    return SprtCounts(rest % fresh, 0), 1 + rest // fresh


def guard_scan(
    bounds: SprtBounds, gaps: Ints, *, stop_from: int | None = None, fixed_a: float | None = None
) -> tuple[list[int], int]:
    """Indices of the errors at which the guard rolls back, and the number of ACCEPTs.

    Only an error can push the llr up, so the clean runs between errors are skipped exactly and
    every error goes through the gateway's own `step`, judged against A_i of the current test i
    (1 + ACCEPTs since the last rollback). With `fixed_a`, the design this replaced: every test
    against the same bound. Stops at the first rollback at an error index >= `stop_from`.
    """
    fresh = successes_to_accept(bounds, SprtCounts())
    counts, rollbacks, accepts, test = SprtCounts(), [], 0, 1
    for index, clean in enumerate(gaps.tolist()):
        counts, accepted = skip_clean(bounds, counts, clean, fresh)
        accepts += accepted
        test += accepted
        if fixed_a is None:
            counts, verdict = step(bounds, counts, True, test)
            rejected = verdict.decision is Decision.REJECT
        else:
            counts = counts.observe(True)
            rejected = bounds.llr(counts.n, counts.k) >= fixed_a
        if rejected:
            rollbacks.append(index)
            counts, test = SprtCounts(), 1  # rolled back: the next canary starts afresh
            if stop_from is not None and index >= stop_from:
                break
    return rollbacks, accepts


def guard_rollbacks(
    bounds: SprtBounds, traffic: Traffic, *, stop_from: int | None, fixed_a: float | None = None
) -> Rollbacks:
    """The guard's rollbacks on `traffic` (see `guard_scan`)."""
    found = guard_scan(bounds, traffic.gaps, stop_from=stop_from, fixed_a=fixed_a)[0]
    index = np.asarray(found, dtype=np.int64)
    return Rollbacks(traffic.error_times[index], traffic.error_ordinals[index])


def failed_checks(check: FixedCheck, traffic: Traffic) -> npt.NDArray[np.bool_]:
    """Whether each check fails: window j covers minutes [j w, (j + 1) w), checked at its end.

    No window here is empty (>= 1200 requests); Flagger and Argo would fail one on "no values".
    """
    boundaries = slice(None, None, check.minutes)
    requests = np.diff(traffic.served_before[boundaries])
    errors = np.diff(traffic.errors_before[boundaries])
    return 100 * errors > check.max_error_percent * requests  # integer: no rounding at 5 %


def fire_indices(failed: npt.NDArray[np.bool_], check: FixedCheck) -> list[int]:
    """Indices of the checks at which a rollback happens; the count restarts after each."""
    fired: list[int] = []
    count, resume = 0, 0
    for index in np.flatnonzero(failed).tolist():
        if index < resume:  # that tick rolled back instead of checking, or a later canary
            continue
        count += 1
        if count == check.fires_at:
            fired.append(index + check.delay)
            count, resume = 0, index + check.delay + 1
    return fired


def check_rollbacks(check: FixedCheck, traffic: Traffic) -> Rollbacks:
    """The fixed check's rollbacks on `traffic`, at the end of the checking tick."""
    ticks = [(j + 1) * check.minutes for j in fire_indices(failed_checks(check, traffic), check)]
    minutes = np.asarray([m for m in ticks if m < traffic.served_before.size], dtype=np.int64)
    return Rollbacks((60 * minutes).astype(np.float64), traffic.served_before[minutes])


def after_change(rollbacks: Rollbacks, traffic: Traffic) -> tuple[float, float, bool]:
    """The first rollback after the change: seconds and requests since it (inf if none).

    Also says whether a false rollback came before the change.
    """
    change = 60.0 * CHANGE_MIN
    early = bool(rollbacks.times.size and rollbacks.times[0] <= change)
    after = np.flatnonzero(rollbacks.times > change)  # a tick at the change saw no broken data
    if after.size == 0:
        return math.inf, math.inf, early
    served = rollbacks.served[after[0]] - traffic.served_before[CHANGE_MIN]
    return float(rollbacks.times[after[0]] - change), float(served), early


def change_runs(rate: int, runs: int, seed: int) -> npt.NDArray[np.float64]:
    """`after_change` for guard, old guard, Flagger-style, Argo-style: (runs, 4 detectors, 3)."""
    rng = np.random.default_rng([seed, rate, 1])
    rows = []
    for _ in range(runs):
        traffic = draw_traffic(
            rng,
            rate,
            minutes=CHANGE_MIN + AFTER_MIN,
            change_min=CHANGE_MIN,
            errors=(E_HEALTHY, E_BROKEN),
        )
        stop_from = int(traffic.errors_before[CHANGE_MIN])  # the first error after the change
        found = [
            guard_rollbacks(GUARD, traffic, stop_from=stop_from),
            guard_rollbacks(GUARD, traffic, stop_from=stop_from, fixed_a=OLD_A),
            check_rollbacks(FLAGGER, traffic),
            check_rollbacks(ARGO, traffic),
        ]
        rows.append([after_change(rollbacks, traffic) for rollbacks in found])
    return np.asarray(rows, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class Healthy:
    """Rollbacks over whole days at a constant error rate: every one of them is false."""

    days: int
    requests: int
    rollbacks: tuple[int, int, int, int]  # guard, old guard, Flagger-style, Argo-style
    guard_tests: int  # completed SPRT tests: ACCEPTs + REJECTs


def healthy_days(rate: int, days: int, seed: int, error_rate: float = E_HEALTHY) -> Healthy:
    """`days` independent days at `rate` with the canary's error rate fixed at `error_rate`."""
    rng = np.random.default_rng([seed, rate, 2, round(error_rate * 1e6)])
    requests, tests, counts = 0, 0, np.zeros(4, dtype=np.int64)
    for _ in range(days):
        traffic = draw_traffic(
            rng, rate, minutes=DAY_MIN, change_min=DAY_MIN, errors=(error_rate, error_rate)
        )
        rejected, accepts = guard_scan(GUARD, traffic.gaps)
        old = guard_scan(GUARD, traffic.gaps, fixed_a=OLD_A)[0]
        requests += int(traffic.served_before[-1])
        tests += len(rejected) + accepts
        counts += [
            len(rejected),
            len(old),
            *(check_rollbacks(c, traffic).times.size for c in CHECKS),
        ]
    a, b, c, d = (int(x) for x in counts)
    return Healthy(days, requests, (a, b, c, d), tests)


def quantile(values: Floats, q: float) -> Floats:
    """Per-detector quantile, always an observed value (Flagger's and Argo's times are ticks)."""
    return np.percentile(values, q, axis=0, method="inverted_cdf")


def fmt(values: Floats, digits: int) -> list[str]:
    return ["none" if math.isinf(v) else f"{v:,.{digits}f}" for v in values.tolist()]


def rate_rows(rate: int, runs: Floats, healthy: Healthy) -> list[list[str]]:
    """The main table's rows for one traffic rate: runs from `change_runs`, a healthy tally."""
    delay, served, early = runs[:, :, 0], runs[:, :, 1], runs[:, :, 2]
    return [
        [str(rate), "median time from change to rollback (s)", *fmt(quantile(delay, 50), 1)],
        [str(rate), "p90 time from change to rollback (s)", *fmt(quantile(delay, 90), 1)],
        [str(rate), "median requests served after change", *fmt(quantile(served, 50), 0)],
        [
            str(rate),
            f"runs with a false rollback in the {CHANGE_MIN} min before",
            *(f"{int(count)}/{len(runs)}" for count in early.sum(axis=0)),
        ],
        [
            str(rate),
            f"false rollbacks per day, healthy ({healthy.days} days)",
            *(f"{count / healthy.days:.1f}" for count in healthy.rollbacks),
        ],
    ]


def guard_row(error_rate: float, rate: int, healthy: Healthy) -> list[str]:
    """The honesty table's row: how often the guard rolls back a canary that is fine."""
    new, old = healthy.rollbacks[0], healthy.rollbacks[1]
    return [
        f"{error_rate:.3f}",
        str(rate),
        f"{healthy.requests:,}",
        f"{healthy.guard_tests:,}",
        str(new),
        str(old),
        f"{new / healthy.requests:.2e}",
        f"{old / healthy.requests:.2e}",
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines) + "\n"


MODELS = """\
Models (see the module docstring): guard = `gateway.core.sprt.step` on every canary response
(e0 0.01, e1 0.05, alpha 0.01, beta 0.10; ACCEPT starts test i + 1 against A_i+1 = ln((i+1)(i+2)
/alpha), REJECT rolls back and the next canary starts at test 1); old guard = the same with every
test against A = ln((1 - beta)/alpha) = ln 90; Flagger-style =
1-min checks failing above 5 % errors, failures never reset by a pass, rollback on the tick after
the 3rd; Argo-style = 5-min measurements from t = 5 min failing above 5 %, rollback when failures
exceed failureLimit 3 (the 4th). Checks tick on the change (their best case); after any rollback
a detector starts afresh. Times are from the change to the rollback; requests are canary
requests served in that span (the guard's include the one that crossed A).
"""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1, help="base seed (default 1)")
    parser.add_argument("--runs", type=int, default=200, help="change runs per rate (200)")
    parser.add_argument("--days", type=int, default=5, help="healthy days per rate (5)")
    parser.add_argument(
        "--mc-runs", type=int, default=300, help="CanaryGuard runs per Monte Carlo cell (300)"
    )
    parser.add_argument(
        "--skip-exact", action="store_true", help="leave out the exact rollout table (minutes)"
    )
    default_out = Path(__file__).with_name("GUARD_SIM.md")
    parser.add_argument("--out", type=Path, default=default_out, help="Markdown report path")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> tuple[list[list[str]], list[list[str]]]:
    """Run every configuration: the main table's rows and the guard-honesty table's rows."""
    main_rows, guard_rows = [], []
    for rate in RATES:
        healthy = healthy_days(rate, args.days, args.seed)
        main_rows += rate_rows(rate, change_runs(rate, args.runs, args.seed), healthy)
        guard_rows.append(guard_row(E_HEALTHY, rate, healthy))
    at_e0 = healthy_days(RATES[0], args.days, args.seed, error_rate=GUARD.e0)
    guard_rows.append(guard_row(GUARD.e0, RATES[0], at_e0))
    return main_rows, guard_rows


def report(args: argparse.Namespace, argv: list[str]) -> str:
    """Measure, then render the Markdown report with its command line and date."""
    started = time.monotonic()
    main_rows, guard_rows = measure(args)
    command = shlex.join([".venv/bin/python", "bench/guard_sim.py", *argv])
    header = ["canary req/s", "measure", "guard (A_i)", "old guard (fixed A)"]
    header += [FLAGGER.name, ARGO.name]
    honesty = ["canary error rate", "canary req/s", "requests", "SPRT tests (A_i)"]
    honesty += [
        "rollbacks (A_i)",
        "rollbacks (fixed A)",
        "per request (A_i)",
        "per request (fixed A)",
    ]
    rollout_section = guard_rollout_report(args)
    took = time.monotonic() - started
    return (
        "# Guard simulation: rollback speed and false rollbacks\n\n"
        f"- command: `{command}`\n"
        f"- date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, took {took:.0f} s\n\n"
        f"A canary's error rate goes from {E_HEALTHY} to {E_BROKEN} at t = {CHANGE_MIN} min; "
        f"{args.runs} runs per rate (seed {args.seed}), all detectors on the same traffic.\n\n"
        f"{table(header, main_rows)}\n"
        "The guard alone on healthy canaries over whole days, one rollout per day (after a\n"
        "rollback the next canary starts at test 1). With A_i, alpha = 0.01 bounds P(any\n"
        "rollback) over the whole rollout at e <= e0; with the old fixed A it bounded one test\n"
        "only, so false rollbacks grew with traffic.\n\n"
        f"{table(honesty, guard_rows)}\n{MODELS}\n{rollout_section}"
    )


HORIZONS = (1_000, 10_000, 100_000)


def guard_rollout_report(args: argparse.Namespace) -> str:
    """DESIGN 5's figures: false rollbacks over a rollout, misses and delays, old and new."""
    seed, runs = args.seed, args.mc_runs
    lines = ["## The guard over a whole rollout (DESIGN 5)\n"]
    if not args.skip_exact:
        rows = []
        for e in (GUARD.e0, GUARD.e0 / 2):
            new = guard_rollout.rollback_by(GUARD, e, HORIZONS)
            old = guard_rollout.rollback_by(GUARD, e, HORIZONS, fixed_a=OLD_A)
            for name, by in (("A_i (alpha spending)", new), ("fixed A = ln 90 (old)", old)):
                rows.append([f"{e:g}", name, *(f"{by[h]:.4f}" for h in HORIZONS)])
        lines += [
            "P(any rollback within N canary requests), exact (dynamic programme over the",
            "guard's thresholds; `bench/guard_rollout.py`):\n",
            table(["e", "design", *(f"N = {h:,}" for h in HORIZONS)], rows),
        ]
        miss_new = guard_rollout.miss_within_first_test(GUARD, GUARD.e1)
        miss_old = guard_rollout.miss_within_first_test(GUARD, GUARD.e1, fixed_a=OLD_A)
        lines.append(
            f"P(no rollback within test 1 | e = e1 = {GUARD.e1}), exact: {miss_new:.4f} with "
            f"A_1 = ln 200, {miss_old:.4f} with the old A = ln 90 (beta = {GUARD.beta}).\n"
        )
    mc_new = guard_rollout.any_rollback_share(
        guard_rollout.CanaryGuard, GUARD.e0, HORIZONS[-1], runs, seed
    )
    mc_old = guard_rollout.any_rollback_share(
        guard_rollout.FixedBoundGuard, GUARD.e0, HORIZONS[-1], runs, seed
    )
    lines.append(
        f"Seeded Monte Carlo through `CanaryGuard` ({runs} rollouts, seed {seed}): P(any "
        f"rollback within {HORIZONS[-1]:,} canary requests | e = e0) = {mc_new:.4f} (A_i), "
        f"{mc_old:.4f} (fixed A).\n"
    )
    rows = []
    for name, kind in (
        ("A_i", guard_rollout.CanaryGuard),
        ("fixed A (old)", guard_rollout.FixedBoundGuard),
    ):
        for healthy in (0, 100_000):
            found = guard_rollout.guard_runs(
                kind,
                healthy=healthy,
                healthy_e=GUARD.e0,
                degraded=(0.05, 0.5),
                runs=runs,
                seed=seed,
            )
            for e, d in found.items():
                rows.append(
                    [
                        name,
                        f"{healthy:,}",
                        f"{e:g}",
                        f"{d.mean:.1f}",
                        f"{d.median:.0f}",
                        f"{d.p90:.0f}",
                        str(d.missed),
                        str(d.prefix_rollbacks),
                    ]
                )
    lines += [
        "Canary requests from the degradation to the rollback, through `CanaryGuard`",
        f"({runs} runs each; the healthy history runs at e = e0 = {GUARD.e0}; a false rollback",
        "during it starts a fresh rollout):\n",
        table(
            [
                "design",
                "healthy requests before",
                "e after",
                "mean",
                "median",
                "p90",
                "not rolled back in 100k",
                "false rollbacks in the history",
            ],
            rows,
        ),
    ]
    rows = []
    horizon = 100_000
    for canary_e in (0.01, 0.02, 0.03):
        for healthy in (0, 100_000):
            r = guard_rollout.relative_runs(
                0.01,
                canary_e,
                weight=0.2,
                requests=horizon,
                runs=runs // 2,
                seed=seed,
                healthy=healthy,
            )
            d = r.delays
            rows.append(
                [
                    f"{canary_e:g}",
                    f"{healthy:,}",
                    f"{r.rollback_share:.4f}",
                    f"{d.mean:.0f}" if math.isfinite(d.mean) else "-",
                    f"{d.median:.0f}" if math.isfinite(d.median) else "-",
                    str(d.prefix_rollbacks),
                ]
            )
    lines += [
        "Relative mode through `CanaryGuard` (ratio 2, stable at 0.01, canary share 0.2,",
        f"{runs // 2} runs each, up to {horizon:,} requests of both arms after the history; a",
        "rollback at canary 0.01 is a false one, bounded by alpha = 0.01):\n",
        table(
            [
                "canary e",
                "healthy requests before",
                "P(rollback)",
                "mean canary requests",
                "median",
                "false rollbacks in the history",
            ],
            rows,
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    text = report(args, argv)
    print(text, end="")
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
