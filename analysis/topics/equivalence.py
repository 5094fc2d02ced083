"""Evidence topic **equivalence**: claims C1–C3 (the reparameterisation maps, SPEC §3) and figure F6.

Notebook: ``notebooks/03_equivalence.py``.  Rows: the ``equivalence`` experiment (max relative
output residual of each exact map over random configurations, per dtype, and the C3
counterexamples' row-space residuals).
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..evidence import ClaimSpec, FigureSpec, Outcome, Topic
from ..plotting import WIDTH, empty, legend_below, sel
from ..stats import fmt

TOL = {"float64": 1e-12, "float32": 1e-5}   # max relative residual of an exact map, per dtype
COUNTEREXAMPLE_MIN = 1e-3                   # rowspace residual that makes W_g non-representable


# C1 -------------------------------------------------------------------------
def _residuals(equivalence: pd.DataFrame, metric: str) -> dict[str, float]:
    sub = equivalence[equivalence.metric == metric]
    return {str(d): float(g.value.max()) for d, g in sub.groupby("dtype")}


def evaluate_c1(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C1.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    res = _residuals(eq, "C1_identity_talk")
    n_cfg = eq[eq.metric == "C1_identity_talk"].groupby("dtype").size().to_dict()
    bad = {d: r for d, r in res.items() if not r <= TOL.get(d, TOL["float32"])}
    if not res:
        verdict, reason = "inconclusive", "no C1_identity_talk rows in the equivalence results"
    elif bad:
        verdict, reason = "refuted", "residual above tolerance: " + ", ".join(
            f"{d} {fmt(r)} > {TOL.get(d, TOL['float32']):g}" for d, r in bad.items())
    else:
        verdict = "holds"
        reason = "every residual ≤ its tolerance: " + ", ".join(
            f"{d} max {fmt(r)} ≤ {TOL.get(d, TOL['float32']):g}" for d, r in sorted(res.items()))
    key = "max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(res.items()))
    ranges = ", ".join(f"{c} ∈ {int(eq[c].min())}..{int(eq[c].max())}" for c in ("E", "m", "d_in", "d_out") if c in eq)
    ev = [f"- Max relative output residual (TalkLoRA with T = I vs MoELoRA-code with the same A, C, B, "
          f"W_r), over random configurations ({ranges}): "
          + "; ".join(f"{d}: {fmt(r)} over {n_cfg.get(d, 0)} configurations" for d, r in sorted(res.items()))]
    return Outcome(verdict, reason, key, ev)


# C2 -------------------------------------------------------------------------
def evaluate_c2(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C2.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    absorb = _residuals(eq, "C2_absorption")
    ident = _residuals(eq, "C1_identity_talk")
    over = {f"{m} {d}": r for m, rs in (("absorption", absorb), ("identity", ident))
            for d, r in rs.items() if not r <= TOL.get(d, TOL["float32"])}
    if not absorb or not ident:
        verdict, reason = "inconclusive", "missing C1/C2 residual rows"
    elif over:
        verdict, reason = "inconclusive", ("a reparameterisation map fails numerically ("
                                          + ", ".join(f"{k} {fmt(v)}" for k, v in over.items())
                                          + "), so neither equality nor strictness is shown")
    else:
        verdict = "refuted"
        reason = ("TalkLoRA(A, C, B, T, W_r) = MoELoRA-code(A, C, B, W_r(T⊗I)) for every tested T "
                  "(absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
                  + ") and MoELoRA-code = TalkLoRA with T = I (C1), so the two function classes are "
                  "equal: there is no function TalkLoRA computes that MoELoRA-code cannot")
    c9_verdict = verdicts.get("C9")
    c9 = f" (C9 verdict on these data: **{c9_verdict}**)" if c9_verdict else ""
    statement = ("As function classes, TalkLoRA with a linear Talking Module equals MoELoRA-code "
                 "(absorption W' = W_r(T⊗I_m) one way, T = I the other); it is not a strict "
                 "generalisation. 'Strictly' can only hold as a statement about the parameterisation "
                 "(different gradients / optimisation trajectory from the same function), which is "
                 f"what C9 tests{c9}.")
    key = "absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
    n = eq[eq.metric == "C2_absorption"].groupby("dtype").size().to_dict()
    ev = [f"- Absorption map W' = W_r(T⊗I_m), official-init T, W_r scaled ×4, B ~ N(0, 1): max relative "
          f"residual " + "; ".join(f"{d}: {fmt(r)} over {n.get(d, 0)} configurations" for d, r in sorted(absorb.items())),
          f"- Identity map (C1): max residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(ident.items()))]
    return Outcome(verdict, reason, key, ev, statement=statement)


# C3 -------------------------------------------------------------------------
def evaluate_c3(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C3.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    incl = _residuals(eq, "C3_inclusion")
    counter = eq[eq.metric == "C3_counterexample_rowspace_residual"].value
    cmin = float(counter.min()) if len(counter) else math.nan
    bad = {d: r for d, r in incl.items() if not r <= TOL.get(d, TOL["float32"])}
    if not incl:
        verdict, reason = "inconclusive", "no C3_inclusion rows"
    elif bad:
        verdict, reason = "refuted", "inclusion residual above tolerance: " + ", ".join(
            f"{d} {fmt(r)}" for d, r in bad.items())
    elif not cmin > COUNTEREXAMPLE_MIN:
        verdict, reason = "inconclusive", (f"inclusion holds but the smallest counterexample rowspace residual "
                                          f"{fmt(cmin)} is not > {COUNTEREXAMPLE_MIN:g} (or there is none)")
    else:
        verdict = "holds"
        reason = (f"inclusion residual ≤ tol (" + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(incl.items()))
                  + f") and every counterexample has rowspace residual ≥ {fmt(cmin)} > {COUNTEREXAMPLE_MIN:g}")
    key = f"inclusion max {', '.join(f'{d} {fmt(r)}' for d, r in sorted(incl.items()))}; counterexample min residual {fmt(cmin)}"
    ev = [f"- Inclusion MoELoRA-code(W') = MoELoRA-input(W_g = W'A) applied to absorbed TalkLoRA layers: "
          f"max relative residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(incl.items())),
          f"- Counterexamples (MoELoRA-input with router rows outside rowspace(A), invertible C_e; E ≥ 2, "
          f"float64): {len(counter)} built, least-squares rowspace residual min {fmt(cmin)}, "
          f"median {fmt(float(counter.median()) if len(counter) else math.nan)}",
          "- Condition: 'not conversely' is with the same experts (A, C_e, B_e); a MoELoRA-input "
          "router whose rows leave rowspace(A) reads directions of x the code h = Ax never sees."]
    return Outcome(verdict, reason, key, ev)


# ----------------------------------------------------------------------------- F6 equivalence residuals
F6_LABELS = {"C1_identity_talk": "C1\nT = I ⇒ MoELoRA", "C2_absorption": "C2\nabsorb T into W_r",
             "C3_inclusion": "C3\ncode ⊆ input router"}
F6_COUNTER = "C3_counterexample_rowspace_residual"


def prepare_f6(equivalence: pd.DataFrame) -> pd.DataFrame:
    cols = [c for c in ("seed", "config", "E", "m", "d_in", "d_out", "dtype", "metric", "value") if c in equivalence]
    return equivalence[cols].reset_index(drop=True)


F6_ZERO = 1e-18       # exact zeros only; every non-zero residual is drawn at its value


def draw_f6(data: pd.DataFrame):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(WIDTH, 3.4), gridspec_kw={"width_ratios": [3, 1.1]})
    metrics = [m for m in F6_LABELS if m in set(data["metric"])]
    dtypes = sorted(data["dtype"].unique())
    pal = {"float32": "#ff7f0e", "float64": "#1f77b4"}
    rng = np.random.default_rng(0)
    for i, metric in enumerate(metrics):
        for j, dt in enumerate(dtypes):
            v = sel(data, metric=metric, dtype=dt)["value"].to_numpy(float)
            x = i + (j - 0.5) * 0.35 + rng.uniform(-0.08, 0.08, len(v))
            ax.scatter(x, np.where(v > 0, v, F6_ZERO), s=14, alpha=0.7, color=pal.get(dt),
                       label=f"{dt}" if i == 0 else None, edgecolor="none")
    for dt, eps in (("float32", np.finfo(np.float32).eps), ("float64", np.finfo(np.float64).eps)):
        ax.axhline(eps, color=pal[dt], ls="--", lw=0.9, label=f"{dt} machine ε")
    ax.set_yscale("log")
    ax.set_ylim(F6_ZERO / 3, 1e-3)
    ax.set_xticks(range(len(metrics)), [F6_LABELS[m] for m in metrics])
    ax.set_ylabel("relative max-abs output residual\nmax|Δy| / max|y|")
    ax.set_title("Exact reparameterisations (random configs)", fontsize=9.5)
    if ((data["value"] == 0) & data["metric"].isin(metrics)).any():
        ax.axhline(F6_ZERO, color="0.5", ls=":", lw=0.8, label=f"exact 0 (drawn at {F6_ZERO:g})")
    c = data[data["metric"] == F6_COUNTER]
    if len(c):
        # seeded jitter: the same data always gives the same image
        ax2.scatter(rng.uniform(-0.15, 0.15, len(c)), c["value"], color="#2ca02c", s=16)
        ax2.set_xlim(-0.5, 0.5)
        ax2.axhline(0, color="0.3", lw=0.8)
        ax2.set_ylim(bottom=-0.02)
        ax2.set_ylabel("row-space residual of W_g in A\n(> 0: not representable)")
    else:
        empty(ax2)
    ax2.set_xticks([0], ["C3 counter-\nexample"])
    ax2.set_title("input ⊄ code (float64)", fontsize=9.5)
    fig.tight_layout()
    h, lab = ax.get_legend_handles_labels()
    legend_below(fig, h, lab, ncol=3)
    return fig


# ----------------------------------------------------------------------------- declarations
C1 = ClaimSpec(
    "C1", paper="TalkLoRA reduces to MoELoRA when communication is the identity",
    statement=("TalkLoRA with T = I computes exactly the same function as MoELoRA with the code "
               "router (router_input=\"code\") and the same A, C_e, B_e, W_r."),
    rule=("holds if max relative residual of `C1_identity_talk` ≤ tol for every dtype (float64 1e-12, "
          "float32 1e-5); refuted if any residual exceeds tol; inconclusive if a backing test failed."),
    figures=("F6",), tests=(r"tests/test_properties\.py::test_c1_",), experiments=("equivalence",),
    evaluate=evaluate_c1)
C2 = ClaimSpec(
    "C2", paper='TalkLoRA "strictly generalises" MoELoRA',
    statement=("As function classes, TalkLoRA with a linear Talking Module equals MoELoRA-code; it is "
               "not a strict generalisation (see C9 for the parameterisation)."),
    rule=("C2 uses the absorption residuals `C2_absorption` and C1's residuals: if both ≤ tol (and no "
          "backing test failed) the class of functions with linear T EQUALS MoELoRA-code, so the "
          "claim, read as a statement about function classes, is refuted; if a residual exceeds tol "
          "the maps fail numerically and the verdict is inconclusive."),
    figures=("F6",), tests=(r"tests/test_properties\.py::test_c2_",), experiments=("equivalence",),
    evaluate=evaluate_c2, uses_verdicts=("C9",), gate=("C2", "C1"))
C3 = ClaimSpec(
    "C3", paper="TalkLoRA ⊆ MoELoRA-input, not conversely",
    statement=("Every TalkLoRA (and MoELoRA-code) layer equals a MoELoRA-input layer with "
               "W_g = W_r(T⊗I)A; a MoELoRA-input layer whose router rows are not in rowspace(A) has "
               "no TalkLoRA equivalent with the same experts."),
    rule=("holds if `C3_inclusion` ≤ tol for every dtype and the smallest "
          "`C3_counterexample_rowspace_residual` > 1e-3; refuted if the inclusion residual exceeds "
          "tol; inconclusive if the counterexample is representable (≤ 1e-3) or a backing test failed."),
    figures=("F6",), tests=(r"tests/test_properties\.py::test_c3_", r"tests/test_properties\.py::test_counterexample_"),
    experiments=("equivalence",), evaluate=evaluate_c3)

F6 = FigureSpec(
    "F6", "equivalence_residuals", ("equivalence",), prepare_f6, draw_f6,
    "Equivalence maps ({claims}) on random configurations: relative output residual of "
    "identity-T TalkLoRA vs MoELoRA (C1), absorbing T into the router (C2), code router as input "
    "router (C3) in float32/float64, with machine ε for reference (exact zeros drawn at 1e-18). "
    "Right: the C3 counterexample's row-space residual, > 0 means the input router is not "
    "representable by any code router.")

TOPIC = Topic("equivalence", "03_equivalence.py", claims=(C1, C2, C3), figures=(F6,))
