"""The guard over a whole rollout (DESIGN 5): false rollbacks and detection delays, exact and
through the gateway's own `CanaryGuard`.

Exact (`rollback_by`): a test is a walk over (k errors, m clean responses) that accepts when
llr(k + m, k) <= B, which after k errors happens at the first m >= m_acc(k), and rejects at an
error when llr >= A_i, i.e. when the k-th error arrives with m <= m_rej_i(k). Both thresholds
come from the project's `SprtBounds.llr` and `rejection_bound`. Between errors the clean run is
geometric, so the law of one test is a dynamic programme over k with a vector over m (a
first-order filter does the geometric convolution); an accepting test has length k + m_acc(k).
Tests follow one another (renewal): the distribution of the request at which test i starts is
convolved with test i's accepting lengths, and the rollback probability by request N sums, over
tests, P(test i starts at t) * P(test i rejects within N - t). Nothing is sampled.

Monte Carlo (`guard_runs`, `relative_runs`): seeded runs that feed every response to a real
`CanaryGuard` (the request path's object), to confirm the exact figures and to measure
detection delays, also after 100,000 healthy requests, where the state a degradation meets is
whatever the guard's history left.

The old design (every test against Wald's single A = ln((1 - beta)/alpha)) is `FixedBoundGuard`
in Monte Carlo and `fixed_a` in the exact calculation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.signal import fftconvolve, lfilter

from gateway.control.guard import CanaryGuard
from gateway.core.flags import Guard
from gateway.core.sprt import SprtBounds, rejection_bound, wald_rejection_bound
from gateway.flagstore.base import GuardState

Floats = npt.NDArray[np.float64]
TAIL = 1e-16  # probability mass below which a test or a renewal is followed no further
FLOOR = 1e-14  # relative size below which a renewal's FFT output is round-off


# --- exact ------------------------------------------------------------------------------------


def accept_clean(bounds: SprtBounds, k: int) -> int:
    """The least m with llr(k + m, k) <= B: clean responses that accept after k errors."""
    m = max(0, math.floor((bounds.B - k * bounds.log_error_ratio) / bounds.log_success_ratio))
    while m > 0 and bounds.llr(k + m - 1, k) <= bounds.B:
        m -= 1
    while bounds.llr(k + m, k) > bounds.B:
        m += 1
    return m


def reject_clean(bounds: SprtBounds, a: float, k: int) -> int:
    """The most m with llr(k + m, k) >= a (-1 if none): the k-th error rejects iff m <= it."""
    if k * bounds.log_error_ratio < a:
        return -1
    m = math.floor((a - k * bounds.log_error_ratio) / bounds.log_success_ratio)
    while m >= 0 and bounds.llr(k + m, k) < a:
        m -= 1
    while bounds.llr(k + m + 1, k) >= a:
        m += 1
    return m


@dataclass(frozen=True, slots=True)
class OneTest:
    """One test's outcome from a fresh start: accepting lengths and probabilities, rejecting
    lengths' probability mass (index = length), and the mass left undecided (truncation)."""

    accept_at: npt.NDArray[np.int64]
    accept_p: Floats
    reject_p: Floats
    undecided: float


def law_of_test(bounds: SprtBounds, a: float, e: float, max_length: int) -> OneTest:
    """The law of one test judged against rejection bound `a` at error rate e."""
    keep = 1.0 - e
    accept_at, accept_p = [], []
    reject_p = np.zeros(max_length + 1)
    # p[j] = P(k errors so far, m = lo + j clean, undecided); k = 0 starts at m = 0.
    k, lo, p = 0, 0, np.ones(1)
    while True:
        hi = accept_clean(bounds, k)  # undecided support is lo .. hi - 1
        if hi <= lo or p.sum() < TAIL or k + lo > max_length:
            break
        p = np.concatenate([p, np.zeros(hi - lo - p.size)]) if p.size < hi - lo else p
        # Accepting: no error in the remaining hi - m clean responses.
        m = lo + np.arange(p.size)
        accepted = float(np.dot(p, keep ** (hi - m)))
        if k + hi <= max_length:
            accept_at.append(k + hi)
            accept_p.append(accepted)
        # The next error at m' in [m, hi): P = p(m) keep^(m' - m) e, summed by a filter.
        nxt = e * lfilter([1.0], [1.0, -keep], p)
        k += 1
        cut = reject_clean(bounds, a, k)  # rejected iff m' <= cut
        if cut >= lo:
            j = min(cut - lo + 1, nxt.size)
            lengths = k + lo + np.arange(j)
            inside = lengths <= max_length
            np.add.at(reject_p, lengths[inside], nxt[:j][inside])
            nxt, lo = nxt[j:], lo + j
        p = nxt
    left = float(p.sum()) if p.size else 0.0
    return OneTest(np.asarray(accept_at, dtype=np.int64), np.asarray(accept_p), reject_p, left)


def rollback_by(
    bounds: SprtBounds,
    e: float,
    horizons: tuple[int, ...],
    *,
    fixed_a: float | None = None,
) -> dict[int, float]:
    """P(any rollback within N canary requests) for each N in `horizons`, exactly."""
    n = max(horizons)
    start = np.zeros(n + 1)
    start[0] = 1.0  # P(the current test starts at request t, nothing rolled back before)
    by = dict.fromkeys(horizons, 0.0)
    dropped = 0.0
    laws: dict[float, tuple[Floats, Floats]] = {}
    test = 1
    while True:
        # The start distribution is a narrow bump moving right: work on its support only.
        support = np.flatnonzero(start)
        if support.size == 0 or start.sum() <= TAIL:
            break
        lo, hi = int(support[0]), int(support[-1]) + 1
        a = fixed_a if fixed_a is not None else rejection_bound(bounds.alpha, test)
        if a not in laws:
            law = law_of_test(bounds, a, e, n)
            accept = np.zeros(int(law.accept_at.max()) + 1 if law.accept_at.size else 1)
            accept[law.accept_at] = law.accept_p
            last = np.flatnonzero(accept > TAIL * TAIL)
            accept = accept[: int(last[-1]) + 1] if last.size else accept[:1]
            laws[a] = (np.cumsum(law.reject_p), accept)
        cdf, accept = laws[a]
        window = start[lo:hi]
        for horizon in horizons:
            # sum over t <= N of start[t] * P(reject at length <= N - t)
            top = min(hi, horizon + 1)
            if top > lo:
                reach = cdf[horizon - top + 1 : horizon - lo + 1][::-1]  # t = lo .. top - 1
                by[horizon] += float(np.dot(window[: top - lo], reach))
        moved = fftconvolve(window, accept)
        # FFT round-off (~1e-16 of the peak) would spread the support over the whole range:
        # values below FLOOR of the peak go (the mass so dropped is reported, not hidden).
        cut = moved < FLOOR * moved.max()
        dropped += float(moved[cut].sum())
        moved[cut] = 0.0
        start = np.zeros(n + 1)
        end = min(n + 1, lo + moved.size)
        start[lo:end] = moved[: end - lo]
        test += 1
    if dropped > 1e-6:
        raise ArithmeticError(f"{dropped:.2e} of probability mass lost to truncation")
    return by


def miss_within_first_test(bounds: SprtBounds, e: float, *, fixed_a: float | None = None) -> float:
    """P(test 1 does not roll back | e): it accepts (or, negligibly, never decides)."""
    a = fixed_a if fixed_a is not None else rejection_bound(bounds.alpha, 1)
    law = law_of_test(bounds, a, e, 1_000_000)
    return 1.0 - float(law.reject_p.sum())


# --- through CanaryGuard ----------------------------------------------------------------------


class Trips:
    def __init__(self) -> None:
        self.rejected = False

    def reject(self, _: CanaryGuard) -> None:
        self.rejected = True

    def accept(self, _: CanaryGuard) -> None:
        pass


class FixedBoundGuard(CanaryGuard):
    """The old design, for comparison only: every test against Wald's single bound."""

    def _configure(self, config: Guard) -> None:
        super()._configure(config)
        self.A = wald_rejection_bound(config.alpha, config.beta)

    def _next_test(self, test: int, *, new_step: bool) -> None:
        super()._next_test(test, new_step=new_step)
        self.A = wald_rejection_bound(self.config.alpha, self.config.beta)


def new_guard(kind: type[CanaryGuard], config: Guard) -> tuple[CanaryGuard, Trips]:
    trips = Trips()
    guard = kind("sim", config, on_reject=trips.reject, on_accept=trips.accept)
    guard.restart(GuardState(rollout="sim"))
    return guard, trips


def requests_to_rollback(
    guard: CanaryGuard, trips: Trips, rng: np.random.Generator, e: float, cap: int
) -> int | None:
    """Feed canary responses at error rate e until the guard rolls back (None within `cap`)."""
    observe, fed = guard.observe, 0
    while fed < cap:
        chunk = min(1024, cap - fed)
        for i, error in enumerate((rng.random(chunk) < e).tolist(), start=1):
            observe(error)
            if trips.rejected:
                return fed + i
        fed += chunk
        guard.ends.clear()  # no flusher here; ended tests would only pile up
    return None


@dataclass(frozen=True, slots=True)
class Delays:
    """Canary requests from the degradation to the rollback, over the runs that rolled back."""

    mean: float
    median: float
    p90: float
    missed: int  # runs with no rollback within the cap
    prefix_rollbacks: int  # false rollbacks during the healthy prefix (then a fresh rollout)


def guard_runs(
    kind: type[CanaryGuard],
    *,
    healthy: int,
    healthy_e: float,
    degraded: tuple[float, ...],
    runs: int,
    seed: int,
    cap: int = 100_000,
) -> dict[float, Delays]:
    """Per degraded error rate: requests to roll back after `healthy` requests at `healthy_e`
    (the same healthy history for every rate in a run; a false rollback during it starts a
    fresh rollout, as a redeploy would)."""
    rng = np.random.default_rng(seed)
    found: dict[float, list[float]] = {e: [] for e in degraded}
    prefix_rollbacks = 0
    for _ in range(runs):
        guard, trips = new_guard(kind, Guard())
        left = healthy
        while left > 0:
            used = requests_to_rollback(guard, trips, rng, healthy_e, left)
            if used is None:
                break
            prefix_rollbacks += 1
            left -= used
            guard, trips = new_guard(kind, Guard())
        for e in degraded:
            branch, branch_trips = copy.deepcopy(guard), Trips()
            branch._on_reject = branch_trips.reject
            got = requests_to_rollback(branch, branch_trips, rng, e, cap)
            found[e].append(math.inf if got is None else float(got))
    return {e: summarise(values, prefix_rollbacks) for e, values in found.items()}


def summarise(values: list[float], prefix_rollbacks: int) -> Delays:
    got = np.asarray([v for v in values if math.isfinite(v)])
    if got.size == 0:
        return Delays(math.inf, math.inf, math.inf, len(values), prefix_rollbacks)
    return Delays(
        float(got.mean()),
        float(np.median(got)),
        float(np.percentile(got, 90)),
        len(values) - got.size,
        prefix_rollbacks,
    )


def any_rollback_share(
    kind: type[CanaryGuard], e: float, horizon: int, runs: int, seed: int
) -> float:
    """Seeded Monte Carlo of P(any rollback within `horizon` canary requests | e)."""
    rng = np.random.default_rng(seed)
    rolled = 0
    for _ in range(runs):
        guard, trips = new_guard(kind, Guard())
        rolled += requests_to_rollback(guard, trips, rng, e, horizon) is not None
    return rolled / runs


# --- relative mode ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RelativeResult:
    rollback_share: float  # runs rolled back within the horizon
    delays: Delays  # canary requests to the rollback, over the runs that rolled back


def relative_runs(
    stable_e: float,
    canary_e: float,
    *,
    weight: float,
    requests: int,
    runs: int,
    seed: int,
    healthy: int = 0,
) -> RelativeResult:
    """Relative mode through `CanaryGuard`: each request goes to the canary with probability
    `weight`; after `healthy` requests with both arms at `stable_e`, the canary fails at
    `canary_e` for up to `requests` more. Counts canary requests to the rollback."""
    rng = np.random.default_rng(seed)
    config = Guard(mode="relative")
    delays: list[float] = []
    prefix_rollbacks = 0
    for _ in range(runs):
        guard, trips = new_guard(CanaryGuard, config)
        history = feed(guard, trips, rng, stable_e, stable_e, weight, healthy) if healthy else None
        if history is not None:
            prefix_rollbacks += 1
            guard, trips = new_guard(CanaryGuard, config)
        got = feed(guard, trips, rng, stable_e, canary_e, weight, requests)
        delays.append(math.inf if got is None else float(got))
    rolled = sum(math.isfinite(d) for d in delays)
    return RelativeResult(rolled / runs, summarise(delays, prefix_rollbacks))


def feed(
    guard: CanaryGuard,
    trips: Trips,
    rng: np.random.Generator,
    stable_e: float,
    canary_e: float,
    weight: float,
    requests: int,
) -> int | None:
    """Canary requests until the rollback (None if none within `requests` requests)."""
    to_canary = (rng.random(requests) < weight).tolist()
    draws = rng.random(requests).tolist()
    observe, observe_stable = guard.observe, guard.observe_stable
    canary = 0
    for goes_to_canary, u in zip(to_canary, draws, strict=True):
        if goes_to_canary:
            canary += 1
            observe(u < canary_e)
            if trips.rejected:
                return canary
        else:
            observe_stable(u < stable_e)
            if trips.rejected:
                return canary
    guard.ends.clear()
    return None
