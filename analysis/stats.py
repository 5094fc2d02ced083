"""Statistics of the claims and figures, on ``scipy.stats`` (no hand-written quantile tables).

* :func:`t_interval` / :func:`estimate` — mean over replicates (seeds) with a two-sided Student-t
  interval ``mean ± t_{1−α/2, n−1} · s / √n`` (on the log scale for ratios);
* :func:`wilson` — a binomial fraction with its Wilson score interval;
* :func:`mde` — minimum detectable effect of a paired t-test;
* :func:`verdict_from_interval` — the verdict of one comparison from its interval (docs/method.md §5);
* :class:`Comparison` — one paired comparison as a claim reports it (n, effect, interval, margin, MDE);
* :class:`Family` — the comparisons of one claim with Holm's step-down applied once
  (:func:`holm_levels`, :func:`holm`);
* :func:`combine` — a claim's verdict from its comparisons' verdicts (the declared combination).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

CONF = 0.95
SIDES = ("greater", "less")            # the claimed side of a difference: above or below 0


def t_quantile(df: int, conf: float = CONF) -> float:
    """Two-sided ``conf`` Student-t quantile ``t_{(1+conf)/2, df}``; NaN for ``df < 1``."""
    if not 0 < conf < 1:
        raise ValueError(f"conf must be in (0, 1), got {conf!r}")
    return float(stats.t.ppf((1 + conf) / 2, df)) if df >= 1 else math.nan


def t_interval(values, conf: float = CONF) -> tuple[float, float, float, int]:
    """``(mean, lo, hi, n)`` of the finite ``values``: ``mean ± t_{n−1} · sd/√n`` (lo = hi = NaN for n < 2)."""
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    n = len(v)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(v.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    half = t_quantile(n - 1, conf) * float(v.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half, n


@dataclass
class Est:
    """Mean over replicates (seeds) with a 95 % t-interval; ``log=True``: geometric (ratio) scale."""
    mean: float
    lo: float
    hi: float
    n: int
    log: bool = False

    def text(self, digits: int = 3, unit: str = "seed") -> str:
        if self.n == 0 or not math.isfinite(self.mean):
            return "n/a (no data)"
        if self.n < 2 or not math.isfinite(self.lo):
            return f"{fmt(self.mean, digits)} (n = {self.n} {unit}, no interval)"
        return f"{fmt(self.mean, digits)} [{fmt(self.lo, digits)}, {fmt(self.hi, digits)}] (n = {self.n} {unit}s)"


def estimate(values, log: bool = False) -> Est:
    """Mean and 95 % t-interval of ``values`` (one per replicate); ``log``: of log(values), back-transformed."""
    v = np.asarray(list(values), dtype=float)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log(v)
    mean, lo, hi, n = t_interval(v)
    if log:
        mean, lo, hi = (math.exp(x) if math.isfinite(x) else math.nan for x in (mean, lo, hi))
    return Est(mean, lo, hi, n, log)


def wilson(k: int, n: int, conf: float = CONF) -> tuple[float, float, float]:
    """Fraction ``k/n`` with its Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``)."""
    if n == 0:
        return math.nan, math.nan, math.nan
    if not 0 <= k <= n:
        raise ValueError(f"k must be in 0..n = {n}, got {k}")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    lo = 0.0 if k == 0 else max(0.0, float(ci.low))
    hi = 1.0 if k == n else min(1.0, float(ci.high))
    return k / n, lo, hi


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values: sort ascending, ``p_(i) · (m − i + 1)``, running max, cap at 1."""
    p = np.asarray(list(pvalues), dtype=float)
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"pvalues must be finite and in [0, 1], got {p.tolist()}")
    order = np.argsort(p, kind="stable")
    m = len(p)
    adj = np.maximum.accumulate(p[order] * (m - np.arange(m)))
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out


def mde(sd: float, n: int, conf: float = CONF, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t-test, ``(t_{1−α/2} + t_{power}) · sd / √n``
    with df = n − 1 (NaN for n < 2)."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(n - 1, conf) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def verdict_from_interval(ci_low: float, ci_high: float, margin: float, claimed_side: str) -> str:
    """The verdict of one difference (docs/method.md §5): ``refuted`` if the interval lies entirely inside ``±margin``
    (no practically relevant effect, even when it excludes 0: the margin is the smallest effect
    declared relevant) or entirely on the wrong side of 0; else ``holds`` if it lies entirely on the
    claimed side of 0; else ``inconclusive`` (also for a missing interval)."""
    if claimed_side not in SIDES:
        raise ValueError(f"claimed_side must be one of {SIDES}, got {claimed_side!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    if ci_low > ci_high:
        raise ValueError(f"ci_low must be <= ci_high, got {ci_low} > {ci_high}")
    sign = 1.0 if claimed_side == "greater" else -1.0
    lo, hi = sorted((sign * ci_low, sign * ci_high))          # claimed side is now "> 0"
    if hi < 0 or (-margin < lo and hi < margin):
        return "refuted"
    if lo > 0:
        return "holds"
    return "inconclusive"


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a claim (docs/method.md §5): ``effect`` with its interval, ``margin``, ``mde``."""
    name: str
    n: int
    effect: float
    ci_low: float
    ci_high: float
    margin: float
    mde: float
    claimed_side: str = "greater"
    conf: float = CONF

    def __post_init__(self):
        if self.claimed_side not in SIDES:
            raise ValueError(f"claimed_side must be one of {SIDES}, got {self.claimed_side!r}")

    @property
    def verdict(self) -> str:
        return verdict_from_interval(self.ci_low, self.ci_high, self.margin, self.claimed_side)

    @classmethod
    def from_differences(cls, name: str, differences, margin: float, claimed_side: str = "greater",
                         power: float = 0.8, conf: float = CONF) -> "Comparison":
        """From per-replicate paired differences (one per seed): mean, ``conf`` t-interval and the MDE
        at ``power`` (two-sided test at level ``1 − conf``)."""
        v = np.asarray(list(differences), dtype=float)
        v = v[np.isfinite(v)]
        mean, lo, hi, n = t_interval(v, conf)
        sd = float(v.std(ddof=1)) if n > 1 else math.nan
        return cls(name, n, mean, lo, hi, margin, mde(sd, n, conf=conf, power=power), claimed_side, conf)

    @property
    def p_value(self) -> float:
        """Two-sided paired t-test p-value of ``effect = 0``, recovered from the interval (NaN for n < 2)."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return math.nan
        se = (self.ci_high - self.ci_low) / (2 * t_quantile(self.n - 1, self.conf))
        if se == 0:
            return 0.0 if self.effect != 0 else 1.0
        return float(2 * stats.t.sf(abs(self.effect) / se, self.n - 1))

    def at_level(self, conf: float) -> "Comparison":
        """The same comparison with its t-interval widened (or narrowed) to level ``conf``."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return replace(self, conf=conf)
        half = (self.ci_high - self.ci_low) / 2 * t_quantile(self.n - 1, conf) / t_quantile(self.n - 1, self.conf)
        return replace(self, ci_low=self.effect - half, ci_high=self.effect + half, conf=conf)

    def row(self, digits: int = 3) -> list[str]:
        """``name, n, effect, interval, ±margin, MDE, verdict`` as report cells."""
        interval = f"[{fmt(self.ci_low, digits)}, {fmt(self.ci_high, digits)}]"
        if abs(self.conf - CONF) > 1e-12:
            interval += f" ({100 * self.conf:.3g} %)"
        return [self.name, str(self.n), fmt(self.effect, digits), interval, f"±{fmt(self.margin, digits)}",
                fmt(self.mde, digits), self.verdict]


def p_value(differences) -> float:
    """Two-sided one-sample t-test p-value of mean(differences) = 0 (NaN for n < 2; 1 for all-equal
    zeros, 0 for a constant non-zero difference)."""
    v = np.asarray(list(differences), dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan
    if float(v.std(ddof=1)) == 0:
        return 1.0 if float(v.mean()) == 0 else 0.0
    return float(stats.ttest_1samp(v, 0.0).pvalue)


def holm_levels(pvalues, conf: float = CONF) -> list[float]:
    """Holm-ordered interval levels of a family: the comparison with the i-th smallest p-value
    (i = 1…m) gets a ``1 − α/(m − i + 1)`` interval (α = 1 − conf), so its interval excludes 0
    exactly when it passes its Holm step; missing p-values (n < 2) count as the largest."""
    p = np.asarray([x if math.isfinite(x) else 2.0 for x in pvalues], dtype=float)
    alpha, m = 1 - conf, len(p)
    out, stopped = [conf] * m, None
    for i, j in enumerate(np.argsort(p, kind="stable")):
        level = 1 - alpha / (m - i)
        if stopped is None and not p[j] < alpha / (m - i):
            stopped = level            # step-down stops here: later (larger) p-values are not rejected,
        out[j] = stopped or level      # so they keep this step's level (their intervals then hold 0)
    return out


def combine(verdicts) -> str:
    """The one combination of verdicts a claim declares: ``holds`` if every verdict holds (and there is
    one), ``refuted`` if any is refuted (a general claim fails where the effect is absent or
    reversed), else ``inconclusive``."""
    verdicts = list(verdicts)
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "refuted" if "refuted" in verdicts else "inconclusive"


@dataclass(frozen=True)
class Family:
    """The paired comparisons of one claim, corrected for multiplicity once.

    With ``holm=True`` the comparison with the i-th smallest p-value (of m) is reported at level
    ``1 − α/(m − i + 1)`` (:func:`holm_levels`), so its interval excludes 0 exactly when it passes
    Holm's step-down at family-wise α = 1 − conf; ``adjusted_p`` holds Holm's adjusted p-values
    (:func:`holm`).  With ``holm=False`` every comparison keeps its 95 % interval.  A comparison's
    verdict is then :func:`verdict_from_interval` of its (Holm-level) interval — one inside ±margin
    is refuted at any level.

    Two constructors: :meth:`of` re-levels the intervals of comparisons already computed at 95 %
    (their MDE stays at 95 %); :meth:`of_differences` computes each comparison from its per-seed
    differences at its Holm level (interval and MDE)."""
    comparisons: tuple[Comparison, ...]
    holm: bool = True

    @classmethod
    def of(cls, comparisons, holm: bool = True, conf: float = CONF) -> "Family":
        comparisons = [c for c in comparisons if c is not None]
        if not holm:
            return cls(tuple(comparisons), holm=False)
        levels = holm_levels([c.p_value for c in comparisons], conf)
        return cls(tuple(c.at_level(lv) for c, lv in zip(comparisons, levels)))

    @classmethod
    def of_differences(cls, items, holm: bool = True, conf: float = CONF) -> "Family":
        """``items``: ``(name, differences, margin, claimed_side)`` (differences: one per seed)."""
        items = [(name, np.asarray(list(d), dtype=float), margin, side) for name, d, margin, side in items]
        levels = holm_levels([p_value(d) for _, d, _, _ in items], conf) if holm else [conf] * len(items)
        return cls(tuple(Comparison.from_differences(name, d, margin, side, conf=lv)
                         for (name, d, margin, side), lv in zip(items, levels)), holm=holm)

    def __iter__(self):
        return iter(self.comparisons)

    def __len__(self) -> int:
        return len(self.comparisons)

    @property
    def verdicts(self) -> list[str]:
        return [c.verdict for c in self.comparisons]

    @property
    def adjusted_p(self) -> list[float]:
        """Holm-adjusted p-values (a missing p-value, n < 2, counts as 1)."""
        p = [c.p_value for c in self.comparisons]
        return holm([x if math.isfinite(x) else 1.0 for x in p]).tolist() if p else []

    def decide(self) -> tuple[str, str]:
        """:func:`combine` of every comparison's verdict, with the reason in words."""
        comparisons = self.comparisons
        if not comparisons:
            return "inconclusive", "no comparisons"
        verdict = combine(self.verdicts)
        if verdict == "holds":
            return "holds", f"all {len(comparisons)} comparisons hold"
        refuted = [c for c in comparisons if c.verdict == "refuted"]
        if refuted:
            return "refuted", ("refuted by " + "; ".join(
                f"{c.name} {fmt(c.effect)} [{fmt(c.ci_low)}, {fmt(c.ci_high)}] (±{fmt(c.margin)})" for c in refuted[:4])
                + (f" and {len(refuted) - 4} more" if len(refuted) > 4 else ""))
        open_ = [c.name for c in comparisons if c.verdict == "inconclusive"]
        return "inconclusive", (f"{len(open_)} of {len(comparisons)} comparisons undecided (interval neither "
                                f"on the claimed side nor inside ±margin): " + ", ".join(open_[:4]))

def fmt(x, digits: int = 3) -> str:
    """A number for the report: thousands separators for integers, scientific when tiny or huge."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = float(x)
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e15:
        return f"{int(x):,}"
    if abs(x) < 1e-3 or abs(x) >= 1e6:
        return f"{x:.{max(digits - 1, 1)}e}"
    return f"{x:.{digits}g}"


def pct(p: float) -> str:
    return "n/a" if not math.isfinite(p) else f"{100 * p:.1f} %"
