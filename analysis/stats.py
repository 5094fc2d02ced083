"""Statistics of the claims and figures, on ``scipy.stats`` (no hand-written quantile tables).

* :func:`t_interval` / :func:`estimate` — mean over replicates (seeds) with a two-sided Student-t
  interval ``mean ± t_{1−α/2, n−1} · s / √n`` (on the log scale for ratios);
* :func:`wilson` — a binomial fraction with its Wilson score interval;
* :func:`mde` — minimum detectable effect of a paired t-test;
* :func:`verdict_from_interval` — an *analytic* comparison's verdict (holds / refuted / inconclusive:
  C8, C10); :func:`evidence_verdict` / :func:`noninferiority_verdict` — an *empirical* comparison's
  verdict in the vocabulary of docs/method.md §5.4 (:data:`COMPARISON_VERDICTS`);
* :func:`mcnemar` — an accuracy difference per example (exact McNemar) when the seed-level variance is 0;
* :func:`n_needed` — the seeds a comparison needs for its MDE to reach its margin (P4);
* :class:`Comparison` — one paired comparison as a claim reports it (n, effect, interval, margin, MDE,
  and for empirical claims its setting, controls and whether it decides);
* :func:`holm_levels` / :func:`holm` — Holm's step-down as interval levels / adjusted p-values;
  :class:`Family` and :func:`combine` — an *analytic* claim's comparisons and verdict (an empirical
  claim's family and verdict are in :mod:`analysis.claims.decide`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

CONF = 0.95
POWER = 0.8
SIDES = ("greater", "less")            # the claimed side of a difference: above or below 0
ANALYTIC_VERDICTS = ("holds", "refuted", "inconclusive")
COMPARISON_VERDICTS = ("supported", "supported-below-relevance", "no-relevant-effect", "contradicted",
                       "inconclusive", "not-testable")
CLAIM_VERDICTS = (*COMPARISON_VERDICTS, "mixed")
RULES = ("analytic", "evidence", "non-inferiority")   # how a comparison's interval becomes its verdict
TESTS = ("paired t", "exact McNemar")
N_NEEDED_MAX = 10**6


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


def mde(sd: float, n: int, conf: float = CONF, power: float = POWER) -> float:
    """Minimum detectable effect of a two-sided paired t-test, ``(t_{1−α/2} + t_{power}) · sd / √n``
    with df = n − 1 (NaN for n < 2)."""
    if not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (t_quantile(n - 1, conf) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


def _claimed_positive(ci_low: float, ci_high: float, claimed_side: str) -> tuple[float, float]:
    """The interval signed so that the claimed side is ``> 0``."""
    if claimed_side not in SIDES:
        raise ValueError(f"claimed_side must be one of {SIDES}, got {claimed_side!r}")
    if ci_low > ci_high:
        raise ValueError(f"ci_low must be <= ci_high, got {ci_low} > {ci_high}")
    sign = 1.0 if claimed_side == "greater" else -1.0
    lo, hi = sorted((sign * ci_low, sign * ci_high))
    return lo, hi


def verdict_from_interval(ci_low: float, ci_high: float, margin: float, claimed_side: str) -> str:
    """The verdict of one *analytic* comparison (C8, C10; :data:`ANALYTIC_VERDICTS`): ``refuted`` if
    the interval lies entirely inside ``±margin`` or entirely on the wrong side of 0; ``holds`` if it
    lies entirely on the claimed side; else ``inconclusive`` (also for a missing interval)."""
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    if claimed_side not in SIDES:
        raise ValueError(f"claimed_side must be one of {SIDES}, got {claimed_side!r}")
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return "inconclusive"
    lo, hi = _claimed_positive(ci_low, ci_high, claimed_side)
    if hi < 0 or (-margin < lo and hi < margin):
        return "refuted"
    return "holds" if lo > 0 else "inconclusive"


def evidence_verdict(ci_low: float, ci_high: float, margin: float, claimed_side: str,
                     power_met: bool = True) -> str:
    """The verdict of one *empirical* comparison (docs/method.md §5.4), from its interval (at its Holm
    level) and margin, with the claimed side counted as ``> 0``:

    * ``supported`` — the interval excludes 0 on the claimed side and is not entirely inside ±margin;
    * ``supported-below-relevance`` — excludes 0 on the claimed side, entirely inside ±margin;
    * ``no-relevant-effect`` — includes 0, entirely inside ±margin, and P4 met (``power_met``);
    * ``contradicted`` — excludes 0 on the wrong side;
    * ``inconclusive`` — anything else (also a missing interval or margin).

    The rule is symmetric: the wrong side is judged exactly as the claimed side."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high) and math.isfinite(margin) and margin > 0):
        return "inconclusive"
    lo, hi = _claimed_positive(ci_low, ci_high, claimed_side)
    inside = -margin < lo and hi < margin
    if lo > 0:
        return "supported-below-relevance" if inside else "supported"
    if hi < 0:
        return "contradicted"
    return "no-relevant-effect" if inside and power_met else "inconclusive"


def noninferiority_verdict(ci_low: float, ci_high: float, margin: float) -> str:
    """Non-inferiority of a difference ``new − reference`` of a loss (C13): ``supported`` if the
    interval's upper end is below ``margin``, ``contradicted`` if its lower end is above it, else
    ``inconclusive``."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high) and math.isfinite(margin) and margin > 0):
        return "inconclusive"
    if ci_high < margin:
        return "supported"
    return "contradicted" if ci_low > margin else "inconclusive"


def n_needed(sd: float, margin: float, conf: float = CONF, power: float = POWER) -> int | None:
    """The smallest number of paired seeds n (≥ 2) whose :func:`mde` with the observed ``sd`` is at most
    ``margin`` (P4); ``None`` without an sd or beyond :data:`N_NEEDED_MAX`."""
    if not (math.isfinite(sd) and math.isfinite(margin) and margin > 0):
        return None
    if sd == 0:
        return 2
    n = max(2, math.ceil(((stats.norm.ppf((1 + conf) / 2) + stats.norm.ppf(power)) * sd / margin) ** 2))
    if n > N_NEEDED_MAX:
        return None
    while n > 2 and mde(sd, n - 1, conf, power) <= margin:        # the normal guess can overshoot
        n -= 1
    while mde(sd, n, conf, power) > margin:                      # t quantiles are wider than normal ones
        n += 1
    return n


def mcnemar(b: int, c: int, total: int, conf: float = CONF, power: float = POWER) -> dict:
    """An accuracy difference judged per example (docs/method.md §5.4): ``b`` pooled (example, seed)
    pairs where the first method is right and the second wrong, ``c`` the reverse, ``total`` pairs.
    Effect ``(b − c) / total``; exact McNemar p-value (``binomtest(b, b + c, ½)``); interval from the
    Clopper–Pearson interval of ``π = b / (b + c)`` at ``conf``: ``(b + c)/total · (2π − 1)``, or, with no
    discordant pair, ``±`` the exact upper bound of the discordance rate (which bounds |difference|);
    MDE ``(z_{(1+conf)/2} + z_power) · √(q / total)`` with q the discordance rate (its exact upper
    bound when 0)."""
    if not (0 <= b and 0 <= c and b + c <= total and total > 0):
        raise ValueError(f"need 0 <= b, c and b + c <= total > 0, got b={b}, c={c}, total={total}")
    d = b + c
    upper = float(stats.binomtest(d, total).proportion_ci(confidence_level=conf, method="exact").high)
    if d == 0:
        lo, hi, p = -upper, upper, 1.0
    else:
        ci = stats.binomtest(b, d).proportion_ci(confidence_level=conf, method="exact")
        lo, hi = (d / total * (2 * float(x) - 1) for x in (ci.low, ci.high))
        p = float(stats.binomtest(b, d, 0.5).pvalue)
    q = d / total if d else upper
    z = stats.norm.ppf((1 + conf) / 2) + stats.norm.ppf(power)
    return dict(effect=(b - c) / total, ci_low=lo, ci_high=hi, p=p, mde=float(z * math.sqrt(q / total)))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison of a claim (docs/method.md §5): ``effect`` with its interval, ``margin``, ``mde``.

    ``rule`` says how the interval becomes a verdict (:data:`RULES`): ``analytic`` (C8, C10:
    holds / refuted / inconclusive), ``evidence`` (:func:`evidence_verdict`) or ``non-inferiority``
    (:func:`noninferiority_verdict`).  Empirical comparisons also carry their ``setting``, the
    outcome of its positive ``controls`` (``passed`` or the failed ones: then the verdict is
    ``not-testable``), whether the comparison ``deciding`` the claim, the ``test`` behind the
    interval and, when the MDE exceeds the margin (P4 failed), the seeds ``n_needed``."""
    name: str
    n: int
    effect: float
    ci_low: float
    ci_high: float
    margin: float
    mde: float
    claimed_side: str = "greater"
    conf: float = CONF
    rule: str = "analytic"
    setting: str = ""
    controls: str = "passed"
    deciding: bool = False
    test: str = "paired t"
    n_needed: int | None = None

    def __post_init__(self):
        if self.claimed_side not in SIDES:
            raise ValueError(f"claimed_side must be one of {SIDES}, got {self.claimed_side!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.test not in TESTS:
            raise ValueError(f"test must be one of {TESTS}, got {self.test!r}")

    @property
    def power_met(self) -> bool:
        """P4: the minimum detectable effect is at most the margin."""
        return math.isfinite(self.mde) and math.isfinite(self.margin) and self.mde <= self.margin

    @property
    def degenerate(self) -> bool:
        """A t-interval of zero width from ≥ 2 seeds (every paired difference equal): never evidence."""
        return self.test == "paired t" and self.n >= 2 and self.ci_low == self.ci_high

    @property
    def verdict(self) -> str:
        if self.rule == "analytic":
            return verdict_from_interval(self.ci_low, self.ci_high, self.margin, self.claimed_side)
        if self.controls != "passed":
            return "not-testable"
        if self.degenerate:
            return "inconclusive"
        if self.rule == "non-inferiority":
            return noninferiority_verdict(self.ci_low, self.ci_high, self.margin)
        return evidence_verdict(self.ci_low, self.ci_high, self.margin, self.claimed_side, self.power_met)

    @classmethod
    def from_differences(cls, name: str, differences, margin: float, claimed_side: str = "greater",
                         power: float = POWER, conf: float = CONF, **fields) -> "Comparison":
        """From per-replicate paired differences (one per seed): mean, ``conf`` t-interval and the MDE
        at ``power`` (two-sided test at level ``1 − conf``); ``fields``: rule, setting, controls, …"""
        v = np.asarray(list(differences), dtype=float)
        v = v[np.isfinite(v)]
        mean, lo, hi, n = t_interval(v, conf)
        sd = float(v.std(ddof=1)) if n > 1 else math.nan
        value = mde(sd, n, conf=conf, power=power)
        if fields.get("rule", "analytic") != "analytic" and not (value <= margin):
            fields.setdefault("n_needed", n_needed(sd, margin, conf, power))
        return cls(name, n, mean, lo, hi, margin, value, claimed_side, conf, **fields)

    @property
    def null(self) -> float:
        """The value the p-value tests: 0, or the margin for non-inferiority."""
        return self.margin if self.rule == "non-inferiority" else 0.0

    @property
    def p_value(self) -> float:
        """Two-sided paired t-test p-value of ``effect = null``, recovered from the interval (NaN for n < 2)."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return math.nan
        se = (self.ci_high - self.ci_low) / (2 * t_quantile(self.n - 1, self.conf))
        if se == 0:
            return 0.0 if self.effect != self.null else 1.0
        return float(2 * stats.t.sf(abs(self.effect - self.null) / se, self.n - 1))

    def at_level(self, conf: float) -> "Comparison":
        """The same comparison with its t-interval widened (or narrowed) to level ``conf``."""
        if self.n < 2 or not math.isfinite(self.ci_low):
            return replace(self, conf=conf)
        half = (self.ci_high - self.ci_low) / 2 * t_quantile(self.n - 1, conf) / t_quantile(self.n - 1, self.conf)
        return replace(self, ci_low=self.effect - half, ci_high=self.effect + half, conf=conf)

    def interval_text(self, digits: int = 3) -> str:
        text = f"[{fmt(self.ci_low, digits)}, {fmt(self.ci_high, digits)}]"
        return text + (f" ({100 * self.conf:.4g} %)" if abs(self.conf - CONF) > 1e-12 else "")

    def row(self, digits: int = 3) -> list[str]:
        """``name, n, effect, interval, ±margin, MDE, verdict`` as report cells."""
        return [self.name, str(self.n), fmt(self.effect, digits), self.interval_text(digits),
                f"±{fmt(self.margin, digits)}", fmt(self.mde, digits), self.verdict]


def p_value(differences, null: float = 0.0) -> float:
    """Two-sided one-sample t-test p-value of mean(differences) = ``null`` (NaN for n < 2; 1 for all
    differences equal to the null, 0 for another constant difference)."""
    v = np.asarray(list(differences), dtype=float)
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan
    if float(v.std(ddof=1)) == 0:
        return 1.0 if float(v.mean()) == null else 0.0
    return float(stats.ttest_1samp(v, null).pvalue)


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
    """The combination of *analytic* verdicts: ``holds`` if every verdict holds (and there is one),
    ``refuted`` if any is refuted, else ``inconclusive``."""
    verdicts = list(verdicts)
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "refuted" if "refuted" in verdicts else "inconclusive"


@dataclass(frozen=True)
class Family:
    """The paired comparisons of one *analytic* claim (C8, C10), corrected for multiplicity once.

    With ``holm=True`` the comparison with the i-th smallest p-value (of m) is reported at level
    ``1 − α/(m − i + 1)`` (:func:`holm_levels`), so its interval excludes 0 exactly when it passes
    Holm's step-down at family-wise α = 1 − conf; ``adjusted_p`` holds Holm's adjusted p-values
    (:func:`holm`).  With ``holm=False`` every comparison keeps its 95 % interval.

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
