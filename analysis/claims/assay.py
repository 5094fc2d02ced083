"""Margins and positive controls of every setting (docs/method.md §5.2, §5.6), from the
preregistration (:mod:`analysis.prereg`) and the saved runs.

* :func:`margins` — per setting, on each metric's own scale, from the **tuning runs** at the selected
  learning rates (:func:`analysis.protocol.select_lr`), never from the evaluation seeds:
  loss ``loss_fraction × (no-adapter val loss − best adapter val loss)``, accuracy
  ``accuracy_fraction × (best adapter val accuracy − no-adapter val accuracy)``, Gini
  ``gini_fraction × MoELoRA-code's end-of-training val Gini``, churn ``churn_fraction × MoELoRA-code's
  mean churn``, amplification ``amplification_log`` (scale-free).  :meth:`Margins.get` is the one
  strict accessor;
* :class:`Assay` — a setting's controls on the evaluation runs: P1 (adaptation matters), the
  end-of-training gate entropy of every routed method (P2, checked per claim on its deciding methods
  by :meth:`Assay.controls`), the flattening of the best method's validation loss (reported), the
  tuned lr per method;
* :func:`assays` — every setting of the results, computed once per set of frames.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pandas as pd

from .. import methods, prereg, protocol
from ..stats import estimate, fmt
from . import evidence as ev
from .evidence import Run

MARGINS = ("loss", "accuracy", "gini", "churn", "amplification_log")


@functools.lru_cache(maxsize=1)
def registration() -> prereg.Preregistration:
    """The preregistration, loaded and validated once per process."""
    return prereg.load()


def deciding_methods(claim: str) -> tuple[str, ...]:
    """The methods whose comparisons with the reference decide ``claim`` (the preregistration's
    ``[deciding]`` registry tags, or method names), in the preregistration's order."""
    out = []
    for entry in registration().deciding_for(claim):
        out += [entry] if entry in methods.METHODS else list(methods.tagged(entry))
    return tuple(dict.fromkeys(out))


def levels() -> tuple[float, float]:
    """``(conf, power)`` of every interval and MDE, from the preregistration's ``[rules]``."""
    rules = registration().rules
    return float(rules["conf"]), float(rules["power"])


@dataclass(frozen=True)
class Margins:
    """A setting's margins (absolute, on each metric's scale); ``NaN`` where a margin cannot be fixed,
    with the reason in ``why`` (and how each defined one was derived)."""
    values: dict
    why: dict

    def get(self, name: str) -> float:
        """The margin ``name`` (one of :data:`MARGINS`): ``KeyError`` for any other name, NaN when it
        cannot be fixed for this setting (the comparisons that need it are then not testable)."""
        if name not in MARGINS:
            raise KeyError(f"margin {name!r} is not preregistered; declared: {list(MARGINS)}")
        return float(self.values.get(name, math.nan))


def _final(rows: pd.DataFrame) -> pd.DataFrame:
    return ev.last_step(rows, ("method", "seed"))


def _at_selected(tuning: pd.DataFrame, lrs: dict) -> pd.DataFrame:
    """The tuning rows of every method at its selected lr."""
    keep = pd.Series([lrs.get((m,)) for m in tuning["method"]], index=tuning.index)
    return tuning[(tuning["lr"] - keep).abs() <= 1e-12 * tuning["lr"].abs()]


def _constant(values: pd.Series) -> float:
    """The value of a quantity that does not depend on the seed (NaN when it does)."""
    v = values.dropna()
    return float(v.iloc[0]) if len(v) and float(v.max() - v.min()) <= 1e-12 * max(1.0, abs(float(v.mean()))) else math.nan


def no_adapter_val(run: Run, tuned: pd.DataFrame, metric: str) -> tuple[float, str]:
    """The no-adapter reference's validation ``metric``: its tuning runs when it was tuned (a trained
    head), else its evaluation cell when that trains nothing (planted head-only, the LM's frozen base):
    then it is a constant of the setting, the same for every seed, so the evaluation seeds cannot move it."""
    na = run.no_adapter
    t = _final(ev.val_loss(tuned) if metric == "loss" else _val_metric(tuned, metric))
    t = t[t["method"] == na]
    if len(t):
        return float(t["value"].mean()), f"tuning runs of {na}"
    r = _final(ev.val_loss(run.rows) if metric == "loss" else _val_metric(run.rows, metric))
    value = _constant(r[r["method"] == na]["value"])
    if math.isfinite(value):
        return value, f"{na} (trains nothing: the same value for every seed)"
    return math.nan, f"no tuning runs of {na} and its validation {metric} depends on the seed"


def _val_metric(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    r = rows[(rows["split"] == "val") & (rows["metric"] == metric) & (rows["layer"] == "all")]
    return r[r["domain"] == "all"] if "domain" in r else r


def margins(run: Run) -> Margins:
    """The preregistered margins of ``run`` (module docstring), from its tuning sweep."""
    reg = registration()
    values = {"amplification_log": reg.margin_rule("amplification_log")}
    why = {"amplification_log": "preregistered, scale-free (log of the quotient ratio)"}
    tuning = run.tuning
    if tuning is None or not len(tuning) or "lr" not in tuning:
        for name in MARGINS[:-1]:
            values[name], why[name] = math.nan, "no tuning sweep: margins cannot be fixed without the evaluation seeds"
        return Margins(values, why)
    lrs = protocol.select_lr(tuning, by=("method",))
    tuned = _at_selected(tuning, lrs)
    adapters = [m for m in dict.fromkeys(tuned["method"]) if m in methods.METHODS and methods.METHODS[m].adapter]
    for name, metric, better in (("loss", "loss", min), ("accuracy", "accuracy", max)):
        if name == "accuracy" and not run.classification:
            values[name], why[name] = math.nan, "no accuracy in this setting"
            continue
        per = (_final(ev.val_loss(tuned)) if metric == "loss" else _final(_val_metric(tuned, metric)))
        per = per[per["method"].isin(adapters)].groupby("method")["value"].mean()
        base, source = no_adapter_val(run, tuned, metric)
        if not len(per) or not math.isfinite(base):
            values[name], why[name] = math.nan, f"no adapter or no-adapter validation {metric} ({source})"
            continue
        best = better(per.index, key=per.get)
        gain = (base - per[best]) if metric == "loss" else (per[best] - base)
        fraction = reg.margin_rule(f"{name}_fraction")
        values[name] = fraction * gain if gain > 0 else math.nan
        why[name] = (f"{fraction:g} × ({'no-adapter' if metric == 'loss' else best} {fmt(base if metric == 'loss' else per[best])} − "
                     f"{best if metric == 'loss' else 'no-adapter'} {fmt(per[best] if metric == 'loss' else base)}) "
                     f"[validation {metric}, tuning seeds; no-adapter from {source}]"
                     + ("" if gain > 0 else ": the adapters do not beat the no-adapter reference, no margin"))
    code = methods.tagged("baseline", "routed")[0]
    for name, value_of, what in (("gini", lambda r: ev.routing(run, "gini", r, split="val")["end"], "end-of-training val Gini"),
                                 ("churn", lambda r: ev.churn(run, r, split="val" if run.setting.runner == "lm" else "probe"),
                                  "mean churn (decided tokens)")):
        frame = value_of(tuned)
        fraction = reg.margin_rule(f"{name}_fraction")
        if code in frame and frame[code].notna().any():
            level = float(frame[code].mean())
            values[name] = fraction * level if level > 0 else math.nan
            why[name] = f"{fraction:g} × {code}'s {what} {fmt(level)} [tuning seeds]"
        else:
            values[name], why[name] = math.nan, f"no {what} of {code} in the tuning runs"
    return Margins(values, why)


@dataclass
class Assay:
    """A setting's positive controls, computed on its evaluation runs (docs/method.md §5.2)."""
    run: Run
    margins: Margins
    no_adapter_loss: float
    best: str
    best_loss: float
    entropy: dict = field(default_factory=dict)        # routed method -> end gate entropy / log E
    flatten: tuple = ("", math.nan)                    # (best method by final val loss, last-quarter change)
    lrs: dict = field(default_factory=dict)

    @property
    def gain(self) -> float:
        return self.no_adapter_loss - self.best_loss

    @property
    def p1_threshold(self) -> float:
        """The gain P1 asks for: the larger of the relative gain and ``p1_gain_over_margin`` × loss margin."""
        reg = registration()
        by_margin = reg.control("p1_gain_over_margin") * self.margins.get("loss")
        if not math.isfinite(by_margin):          # no loss margin: P1 cannot be checked (max() would skip NaN)
            return math.nan
        return max(reg.control("p1_min_relative_gain") * self.no_adapter_loss, by_margin)

    @property
    def p1(self) -> bool:
        return math.isfinite(self.gain) and math.isfinite(self.p1_threshold) and self.gain >= self.p1_threshold

    def p2(self, names) -> tuple[bool, str]:
        """P2 for the routed methods among ``names``: each one's end gate entropy / log E at most
        ``p2_max_entropy`` (a method without the measurement fails)."""
        limit = registration().control("p2_max_entropy")
        routed = [m for m in names if m in methods.METHODS and methods.METHODS[m].routed and m in self.run.methods()]
        bad = [m for m in routed if not self.entropy.get(m, math.inf) <= limit]
        return not bad, ", ".join(f"{m} {fmt(self.entropy.get(m, math.nan))}" for m in bad)

    def controls(self, names=(), p2: bool = False, extra: dict | None = None) -> str:
        """``passed`` or ``failed: P1, P2 …`` for a claim whose deciding methods are ``names``
        (``p2``: the claim needs P2; ``extra``: further claim-specific checks, name -> passed).  A
        setting whose loss margin cannot be fixed (no tuning runs) fails ``margins``: P1 needs it."""
        failed = (["margins"] if not math.isfinite(self.margins.get("loss"))    # no tuning runs: nothing is relevant
                  else [] if self.p1 else ["P1"])
        if p2 and not self.p2(names)[0]:
            failed.append("P2")
        failed += [k for k, ok in (extra or {}).items() if not ok]
        return "passed" if not failed else "failed: " + ", ".join(failed)


def flattening(run: Run) -> tuple[str, float]:
    """The best adapter method (lowest mean final validation loss) and its mean over seeds of
    |L(end) − L(3/4)| / L(3/4), the validation loss's relative change over the last quarter."""
    v = ev.val_loss(run.rows)
    v = v[v["method"].isin([m for m in run.methods() if methods.METHODS.get(m) and methods.METHODS[m].adapter])]
    if v.empty:
        return "", math.nan
    end = _final(v).groupby("method")["value"].mean()
    best = str(end.idxmin())
    q = min(protocol.quarter_steps(run.steps))
    b = v[v["method"] == best].pivot_table(index="seed", columns="step", values="value")
    if q not in b or run.steps not in b or q == run.steps:
        return best, math.nan
    return best, float(((b[run.steps] - b[q]).abs() / b[q]).mean())


def assay(run: Run) -> Assay:
    """The controls of one setting (P1, the P2 entropies, flattening, tuned lrs)."""
    marg = margins(run)
    loss = ev.heldout(run.rows, "loss")
    adapters = [m for m in loss.columns if m in methods.METHODS and methods.METHODS[m].adapter]
    means = loss[adapters].mean() if adapters else pd.Series(dtype=float)
    best = str(means.idxmin()) if len(means) and means.notna().any() else ""
    ent = ev.routing(run, "token_entropy")["end"]
    return Assay(run, marg, ev.no_adapter_heldout(run), best, float(means[best]) if best else math.nan,
                 {m: float(ent[m].mean()) for m in ent.columns}, flattening(run), ev.tuned_lrs(run))


_CACHE: dict = {}


def assays(data: dict, config: dict | None = None) -> list[Assay]:
    """:func:`assay` of every setting in ``data``, computed once per set of frames (the claims and
    F10 read the same ones)."""
    frames = tuple((name, id(data.get(name))) for name in ev.EXPERIMENTS)
    key = (frames, (config or {}).get("setting", {}).get("name") if isinstance((config or {}).get("setting"), dict) else None)
    if _CACHE.get("key") != key:
        _CACHE.clear()
        _CACHE.update(key=key, frames=[data.get(n) for n in ev.EXPERIMENTS],
                      value=[assay(r) for r in ev.runs(data, config)])
    return _CACHE["value"]


# ----------------------------------------------------------------------------- the report's controls section
def controls_section(items: list[Assay]) -> list[str]:
    """The settings and their positive controls as the report prints them (docs/method.md §5.2): per
    setting its wording, P1 (gain against its threshold), P2 (end gate entropy per routed method), P3
    (twin divergence), the flattening check, the tuned lr per method and the margins as absolute numbers."""
    from ..report import md_table

    reg = registration()
    if not items:
        return ["No setting of an empirical claim is in the results (planted, MiniLM, SmolLM2 or a user setting): "
                "every empirical claim is not testable."]
    limit, p3_limit = reg.control("p2_max_entropy"), reg.control("p3_min_relative_divergence")
    share = float(reg.rules["flatten_share"])
    twin, talk = methods.tagged("function-matched")[0], methods.reference()
    rows, margin_rows = [], []
    for a in items:
        loss = ev.heldout(a.run.rows, "loss")
        p3 = (float((loss[talk] - loss[twin]).abs().mean() / a.no_adapter_loss)
              if talk in loss and twin in loss and a.no_adapter_loss > 0 else math.nan)
        best, change = a.flatten
        rows.append([a.run.wording,
                     f"{'pass' if a.p1 else '**fail**'}: gain {fmt(a.gain)} ({fmt(a.gain / a.no_adapter_loss)} of "
                     f"no-adapter {fmt(a.no_adapter_loss)}; best {methods.label(a.best)}) vs threshold {fmt(a.p1_threshold)}",
                     "; ".join(f"{methods.label(m)} {fmt(v)}{'' if v <= limit else ' **> ' + fmt(limit) + '**'}"
                               for m, v in a.entropy.items()) or "no routed method",
                     f"{fmt(p3)} ({'pass' if p3 >= p3_limit else '**fail**'} at {p3_limit:g})" if math.isfinite(p3) else "n/a",
                     f"{methods.label(best)} {fmt(change)} ({'<' if change < share else '**≥**'} {share:g})"
                     if math.isfinite(change) else "n/a",
                     ", ".join(f"{methods.label(m)} {fmt(lr)}" for m, lr in a.lrs.items()) or "n/a"])
        margin_rows += [[a.run.name, name, fmt(a.margins.get(name)), a.margins.why.get(name, "")] for name in MARGINS]
    out = [f"Positive controls (docs/method.md §5.2) on the evaluation runs, thresholds from the preregistration "
            f"`[controls]`: P1 gain ≥ max({reg.control('p1_min_relative_gain'):g} × no-adapter loss, "
            f"{reg.control('p1_gain_over_margin'):g} × loss margin); P2 end-of-training gate entropy / log E ≤ "
            f"{limit:g} for every routed method a claim compares (checked per claim); P3 (C9) mean |Δ held-out "
            f"loss| of TalkLoRA and its twin / no-adapter loss ≥ {p3_limit:g}; P4 (power) per comparison, in each "
            "claim's table. A setting failing a control a claim needs makes that claim's comparisons there "
            "*not testable*. The flattening check (best method's relative change of validation loss over the last "
            "quarter) is reported, not gating.",
            md_table(["setting", "P1 adaptation matters", "P2 gate entropy / log E (end)", "P3 twin divergence",
                      "flattening (last quarter)", "tuned lr"], rows),
            "Margins per setting (absolute, on each metric's scale; fixed on the tuning runs at the selected lrs):",
            md_table(["setting", "margin", "value", "derivation"], margin_rows)]
    return out + cluster_recovery_section(items)


def cluster_recovery_section(items: list[Assay]) -> list[str]:
    """Where a setting has planted clusters (rows ``cluster_mi``): how well each router's top-1 expert
    recovers the cluster, I(cluster; top-1 expert) / log K on the held-out split, at step 0 and the
    end, mean and 95 % t-interval over seeds (reported beside the controls, not gating)."""
    from ..report import md_table

    rows = []
    for a in items:
        r = a.run.rows
        if "metric" not in r or not (r["metric"] == "cluster_mi").any():
            continue
        mi = r[r["metric"] == "cluster_mi"]
        split = "test" if (mi["split"] == "test").any() else "val"
        start = mi[(mi["split"] == "val") & (mi["step"] == mi["step"].min())]
        end = mi[(mi["split"] == split) & (mi["step"] == mi["step"].max())]
        for m in [m for m in methods.ORDER if m in set(end["method"])]:
            per_seed = lambda f: f[f["method"] == m].groupby("seed")["value"].mean()
            rows.append([a.run.name, methods.label(m), estimate(per_seed(start)).text(),
                         estimate(per_seed(end)).text()])
    if not rows:
        return []
    return ["Cluster recovery per router (settings with planted clusters; reported, not gating): normalised mutual "
            "information between the input's cluster and its top-1 expert, I(cluster; expert) / log K, 0 = the "
            "routing ignores the clusters, 1 = each cluster has its own expert(s); validation split at step 0, "
            "test split at the end; mean [95 % t-interval] over seeds:",
            md_table(["setting", "router", "step 0", "end of training"], rows)]


def preregistration_info(profile: str | None) -> dict:
    """What the report prints about the preregistration: version, date, SHA-256, deviations and
    whether ``profile`` matches its pinned hash (a config that is not a registered profile deviates)."""
    reg = registration()
    name = str(profile or "?")
    return dict(version=reg.version, registered=reg.registered, sha256=reg.sha256, deviations=reg.deviations,
                profile=name, profile_deviation=reg.profile_deviation(name))
