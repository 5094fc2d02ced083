"""How an empirical claim is decided (docs/method.md §5.4–§5.5): its comparisons judged as one Holm
family, the claim's verdict from its deciding comparisons, and the tables that show them.

* :class:`Paired` — one comparison before judging (per-seed paired differences, margin, claimed side,
  setting, the outcome of the setting's positive controls, whether it decides, its rule);
* :func:`judge_family` — Holm's step-down over the deciding comparisons of the *testable* settings
  (each interval and MDE at its Holm-ordered level); reported and not-testable comparisons at 95 %;
* :func:`claim_verdict` — the claim's verdict (supported / contradicted / no-relevant-effect / mixed /
  not-testable / inconclusive) from its deciding comparisons;
* :func:`comparison_table` / :func:`setting_lines` — the evidence the report prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import pandas as pd

from .. import methods
from ..report import md_table
from ..stats import CONF, POWER, Comparison, _claimed_positive, fmt, mcnemar, p_value
from .base import Outcome


@dataclass(frozen=True)
class Paired:
    """One comparison of an empirical claim before judging: per-seed paired ``differences`` (the
    first method − the second), its ``margin`` and claimed side, its setting and controls, whether
    it decides, its rule, and for an accuracy difference the pooled per-example discordant counts
    ``(b, c, total)`` used when the seed-level variance is 0 (:func:`analysis.stats.mcnemar`)."""
    name: str
    differences: tuple
    margin: float
    claimed_side: str
    setting: str = ""
    controls: str = "passed"
    deciding: bool = True
    rule: str = "evidence"
    discordant: tuple | None = None

    @property
    def testable(self) -> bool:
        return self.controls == "passed" and math.isfinite(self.margin) and self.margin > 0

    @property
    def per_example(self) -> bool:
        """Judged per example: zero seed-level variance and per-example counts available."""
        v = np.asarray(self.differences, dtype=float)
        v = v[np.isfinite(v)]
        return self.discordant is not None and len(v) >= 2 and float(v.std(ddof=1)) == 0

    def p_value(self, conf: float = CONF) -> float:
        if self.per_example:
            return mcnemar(*self.discordant, conf=conf)["p"]
        return p_value(self.differences, self.margin if self.rule == "non-inferiority" else 0.0)

    def judge(self, conf: float = CONF, power: float = POWER) -> Comparison:
        """The comparison at level ``conf`` (interval and MDE; the seeds needed when P4 fails).  Without a
        margin (one the tuning runs cannot fix) it is not testable: nothing says what size is relevant."""
        controls = self.controls if self.controls != "passed" or self.testable else "failed: margin"
        fields = dict(rule=self.rule, setting=self.setting, controls=controls, deciding=self.deciding)
        if not self.per_example:
            return Comparison.from_differences(self.name, self.differences, self.margin, self.claimed_side,
                                               power=power, conf=conf, **fields)
        m = mcnemar(*self.discordant, conf=conf, power=power)
        n = len([x for x in self.differences if math.isfinite(x)])
        needed = None if m["mde"] <= self.margin else math.ceil(n * (m["mde"] / self.margin) ** 2)
        return Comparison(self.name, n, m["effect"], m["ci_low"], m["ci_high"], self.margin, m["mde"],
                          self.claimed_side, conf, test="exact McNemar", n_needed=needed, **fields)


def judge_family(items, conf: float = CONF, power: float = POWER) -> list[Comparison]:
    """An empirical claim's comparisons, in the order of ``items`` (:class:`Paired`): Holm's step-down
    over the *deciding comparisons of testable settings* (each judged at its Holm-ordered level,
    :func:`analysis.stats.holm_levels`: interval and MDE); the reported ones and the not-testable ones
    at ``conf``."""
    from ..stats import holm_levels

    items = list(items)
    family = [i for i, it in enumerate(items) if it.deciding and it.testable
              and np.isfinite(np.asarray(it.differences, dtype=float)).sum() >= 2]
    levels = dict(zip(family, holm_levels([items[i].p_value(conf) for i in family], conf)))
    return [it.judge(levels.get(i, conf), power) for i, it in enumerate(items)]


def beyond_margin(c: Comparison) -> bool:
    """A contradicted comparison whose interval is not entirely inside ±margin (the mirror image of
    "supported"; for non-inferiority every contradicted one: its interval lies above the margin)."""
    if c.verdict != "contradicted":
        return False
    if c.rule == "non-inferiority":
        return True
    lo, _ = _claimed_positive(c.ci_low, c.ci_high, c.claimed_side)
    return not -c.margin < lo


def _names(comps, limit: int = 4) -> str:
    names = [c.name for c in comps]
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim_verdict(comparisons, none_testable: str = "no setting passes its positive controls") -> tuple[str, str]:
    """An empirical claim's verdict from its deciding comparisons (docs/method.md §5.5; comparisons with
    ``deciding=False`` are ignored, ``not-testable`` ones never count):

    * ``not-testable`` — no deciding comparison in a testable setting (``none_testable`` says why);
    * ``supported`` — every one is supported;
    * ``contradicted`` — any is contradicted with its interval beyond the margin (:func:`beyond_margin`);
    * ``no-relevant-effect`` — every one is no-relevant-effect, supported-below-relevance or
      contradicted inside ±margin; stated more precisely as ``supported-below-relevance`` when every one
      is supported below relevance (a real effect on the claimed side, everywhere smaller than the margin);
    * ``mixed`` — some are supported and others not (the reason names both);
    * ``inconclusive`` — otherwise."""
    comps = [c for c in comparisons if c.deciding and c.verdict != "not-testable"]
    if not comps:
        return "not-testable", none_testable
    supported = [c for c in comps if c.verdict == "supported"]
    if len(supported) == len(comps):
        return "supported", f"all {len(comps)} deciding comparisons supported"
    beyond = [c for c in comps if beyond_margin(c)]
    if beyond:
        return "contradicted", "contradicted beyond the margin: " + "; ".join(
            f"{c.name} {fmt(c.effect)} {c.interval_text()} (margin {fmt(c.margin)})" for c in beyond[:4])
    small = ("no-relevant-effect", "supported-below-relevance", "contradicted")
    if all(c.verdict == "supported-below-relevance" for c in comps):
        return "supported-below-relevance", (f"all {len(comps)} deciding comparisons on the claimed side but "
                                             "inside ±margin (an effect smaller than the relevance margin)")
    if all(c.verdict in small for c in comps):
        return "no-relevant-effect", (f"all {len(comps)} deciding comparisons show no effect as large as their "
                                      "margin (no relevant effect, below relevance, or contradicted inside ±margin)")
    if supported:
        others = [c for c in comps if c.verdict != "supported"]
        return "mixed", (f"supported: {_names(supported)}; not supported: "
                         + "; ".join(f"{c.name} ({c.verdict})" for c in others[:6])
                         + (f" and {len(others) - 6} more" if len(others) > 6 else ""))
    open_ = [c for c in comps if c.verdict not in small]
    return "inconclusive", f"{len(open_)} of {len(comps)} deciding comparisons undecided: " + _names(open_)


# ----------------------------------------------------------------------------- tables
def comparison_table(comps) -> str:
    """Every comparison of a claim: setting, what is compared, n, effect, interval (at its level),
    margin, MDE (and the seeds P4 would need), the test, whether it decides, the controls, the verdict."""
    rows = [[c.setting or "—", c.name.removeprefix(f"{c.setting}: "), c.n, fmt(c.effect), c.interval_text(), f"±{fmt(c.margin)}",
             fmt(c.mde) + ("" if c.power_met or c.rule == "analytic" else
                           f" (P4 fails: n ≈ {c.n_needed if c.n_needed else '> 10⁶'})"),
             c.test, "yes" if c.deciding else "reported", c.controls, f"**{c.verdict}**"] for c in comps]
    return md_table(["setting", "comparison", "n", "effect", "interval", "margin", "MDE", "test", "decides",
                     "controls", "verdict"], rows) if rows else "(no comparisons)"


def settings_summary(comps) -> str:
    """``<setting>: <verdicts of its deciding comparisons>`` per setting, in order of appearance."""
    per: dict[str, list[str]] = {}
    for c in comps:
        if c.deciding:
            per.setdefault(c.setting or "—", []).append(c.verdict)
    out = []
    for setting, verdicts in per.items():
        counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
        out.append(f"{setting}: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return "; ".join(out) if out else "no deciding comparison"


# ----------------------------------------------------------------------------- building a claim
def pair(name: str, wide: pd.DataFrame, a: str, b: str, margin: float, side: str, *, setting: str,
         controls: str, deciding: bool, rule: str = "evidence", discordant=None) -> Paired | None:
    """:class:`Paired` of ``wide[a] − wide[b]`` (rows: seeds).  When either method did not run: ``None``
    for a reported comparison, an empty one named "(not run)" for a deciding one — it is then
    inconclusive, so a claim cannot be supported without every comparison the preregistration declares."""
    if a in wide and b in wide:
        d = (wide[a] - wide[b]).dropna()
        return Paired(name, tuple(d.to_numpy(float)), margin, side, setting, controls, deciding, rule, discordant)
    return not_run(name, margin, side, setting, controls, rule) if deciding else None


def not_run(name: str, margin: float, side: str, setting: str, controls: str, rule: str = "evidence") -> Paired:
    """A deciding comparison whose methods did not run in a setting: no differences (inconclusive there)."""
    return Paired(f"{name} (not run)", (), margin, side, setting, controls, True, rule)


def settings_table(rows) -> str:
    """``rows``: ``(assay, controls for this claim, margin text)`` per setting."""
    out = [[a.run.wording, controls, margin,
            ", ".join(f"{methods.label(m)} {fmt(lr)}" for m, lr in a.lrs.items())] for a, controls, margin in rows]
    return md_table(["setting", "controls (this claim)", "margin", "tuned lr"], out) if out else "(no setting ran)"


def why_not_testable(tested, nothing: str = "no setting with these methods in the results") -> str:
    """Why a claim has no testable setting: the settings and the controls they failed (or ``nothing``)."""
    failed = [f"{a.run.name} ({c})" for a, c, _ in tested if c != "passed"]
    return ("no setting passes its positive controls: " + "; ".join(failed)) if failed else nothing


def empirical_outcome(comps, tested, verdict: tuple[str, str], *, lines, key: str | None = None) -> Outcome:
    """An empirical claim's :class:`~analysis.claims.base.Outcome`: ``comps`` judged comparisons,
    ``tested``: ``(assay, controls for this claim, margin text)`` per setting; ``verdict``: the claim's
    ``(verdict, reason)``.  The reason is extended with the settings it was judged in."""
    failed = [f"{a.run.name} ({c})" for a, c, _ in tested if c != "passed"]
    v, reason = verdict
    judged = [a.run.wording for a, c, _ in tested if c == "passed"]
    if judged and v != "not-testable":
        reason += " — judged in " + "; ".join(judged)
    if failed and v != "not-testable":
        reason += " — not testable in " + "; ".join(failed)
    first = next((c for c in comps if c.deciding and c.verdict != "not-testable"), None)
    key = key or (f"{first.name}: {fmt(first.effect)} {first.interval_text()} (margin {fmt(first.margin)})"
                  if first else "no testable comparison")
    controls = "; ".join(f"{a.run.name}: {c}" for a, c, _ in tested) or "no setting"
    ev = [*lines, "- Settings (positive controls as this claim needs them; margins fixed on the tuning runs):",
          settings_table(tested),
          "- Comparisons (paired by seed; interval at the comparison's Holm-ordered level over the claim's "
          "deciding comparisons in testable settings, 95 % for the others; MDE at 80 % power at that level):",
          comparison_table(comps), "- Per setting: " + settings_summary(comps) + "."]
    return Outcome(v, reason, key, ev, comparisons=list(comps), controls=controls)
