"""Claims C1–C3 (the reparameterisation maps, docs/method.md §3) and figure F6.

Rows: the ``equivalence`` experiment — the max relative output residual of each exact map over
random configurations, per dtype, and C3's centred row-space residuals and counterexamples.
These claims are analytic: **select** the residuals, sum them up per dtype (the **compare** step:
maxima and minima, no paired statistics), a pure **verdict** from those numbers and the declared
tolerances, then **render** the evidence.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..plotting import WIDTH, empty, legend_below, sel
from ..stats import fmt
from .base import ClaimSpec, FigureSpec, Outcome

TOL = {"float64": 1e-12, "float32": 1e-5}   # max relative residual of an exact map, per dtype
COUNTEREXAMPLE_MIN = 1e-3                   # rowspace residual that makes W_g non-representable
CENTRED_ZERO = 1e-9      # float64 round-off of a centred residual / gate gap that is 0 in exact arithmetic
C3_CENTRED = ("C3_centred_residual_random_input_router", "C3_best_code_output_residual")
C3_ZERO = ("C3_inclusion_centred_residual", "C3_shift_only_centred_residual", "C3_shift_only_gate_residual",
           "C3_best_code_output_residual_B0")


def tol(dtype: str) -> float:
    return TOL.get(dtype, TOL["float32"])


# ----------------------------------------------------------------------------- select
def max_residuals(eq: pd.DataFrame, metric: str) -> dict[str, float]:
    """Max of ``metric`` per dtype."""
    sub = eq[eq.metric == metric]
    return {str(d): float(g.value.max()) for d, g in sub.groupby("dtype")}


def configurations(eq: pd.DataFrame, metric: str) -> dict[str, int]:
    """Number of random configurations per dtype that measured ``metric``."""
    return eq[eq.metric == metric].groupby("dtype").size().to_dict()


def centred_values(eq: pd.DataFrame) -> dict[str, pd.Series]:
    """C3's centred rows (``centred = 1``) per metric."""
    cen = eq[eq["centred"] == 1] if "centred" in eq else eq.iloc[:0]
    return {m: cen[cen.metric == m].value for m in (*C3_CENTRED, *C3_ZERO, "C3_centred_residual_reference")}


# ----------------------------------------------------------------------------- verdicts
def verdict_c1(identity: dict[str, float]) -> tuple[str, str]:
    """Holds if every dtype's max residual is within its tolerance, refuted if one is not."""
    bad = {d: r for d, r in identity.items() if not r <= tol(d)}
    if not identity:
        return "inconclusive", "no C1_identity_talk rows in the equivalence results"
    if bad:
        return "refuted", "residual above tolerance: " + ", ".join(f"{d} {fmt(r)} > {tol(d):g}" for d, r in bad.items())
    return "holds", "every residual ≤ its tolerance: " + ", ".join(
        f"{d} max {fmt(r)} ≤ {tol(d):g}" for d, r in sorted(identity.items()))


def verdict_c2(absorb: dict[str, float], identity: dict[str, float]) -> tuple[str, str]:
    """Both maps exact: the function classes are equal, so "strictly generalises" is refuted."""
    over = {f"{m} {d}": r for m, rs in (("absorption", absorb), ("identity", identity))
            for d, r in rs.items() if not r <= tol(d)}
    if not absorb or not identity:
        return "inconclusive", "missing C1/C2 residual rows"
    if over:
        return "inconclusive", ("a reparameterisation map fails numerically ("
                                + ", ".join(f"{k} {fmt(v)}" for k, v in over.items())
                                + "), so neither equality nor strictness is shown")
    return "refuted", ("TalkLoRA(A, C, B, T, W_r) = MoELoRA-code(A, C, B, W_r(T⊗I)) for every tested T "
                       "(absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
                       + ") and MoELoRA-code = TalkLoRA with T = I (C1), so the two function classes are "
                       "equal: there is no function TalkLoRA computes that MoELoRA-code cannot")


def verdict_c3(inclusion: dict[str, float], mins: dict[str, float], maxs: dict[str, float],
               n_cfg: int) -> tuple[str, str]:
    """``mins``: minima of :data:`C3_CENTRED` (must exceed :data:`COUNTEREXAMPLE_MIN`); ``maxs``:
    maxima of :data:`C3_ZERO` (0 by construction, must stay below :data:`CENTRED_ZERO`)."""
    bad = {d: r for d, r in inclusion.items() if not r <= tol(d)}
    centred = maxs["C3_inclusion_centred_residual"]
    if not math.isnan(centred) and not centred <= CENTRED_ZERO:
        bad["float64 centred"] = centred
    suspect = [m for m in C3_ZERO[1:] if not maxs[m] <= CENTRED_ZERO]
    if not inclusion:
        return "inconclusive", "no C3_inclusion rows"
    if bad:
        return "refuted", "inclusion residual above tolerance: " + ", ".join(f"{d} {fmt(r)}" for d, r in bad.items())
    if n_cfg == 0:
        return "inconclusive", "no centred C3 rows (centred = 1) in the equivalence results"
    if suspect:
        return "inconclusive", ("a centred residual that is 0 by construction is not (the centring "
                                "is suspect): " + ", ".join(f"`{m}` max {fmt(maxs[m])}" for m in suspect))
    if not all(mins[m] > COUNTEREXAMPLE_MIN for m in C3_CENTRED):
        return "inconclusive", ("inclusion holds but some random input router is (nearly) representable "
                                "by a code router: " + ", ".join(f"min `{m}` {fmt(v)}" for m, v in mins.items())
                                + f" (needs > {COUNTEREXAMPLE_MIN:g})")
    return "holds", ("inclusion residual ≤ tol (" + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(inclusion.items()))
                     + f"; centred {fmt(centred)}) and in all {n_cfg} random "
                     f"configurations the centred row-space residual ≥ {fmt(mins[C3_CENTRED[0]])} and the best code "
                     f"router's output gap with B ≠ 0 ≥ {fmt(mins[C3_CENTRED[1]])}, both > {COUNTEREXAMPLE_MIN:g}")


# ----------------------------------------------------------------------------- evaluate (select → verdict → render)
def evaluate_c1(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C1.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    res = max_residuals(eq, "C1_identity_talk")
    n_cfg = configurations(eq, "C1_identity_talk")
    verdict, reason = verdict_c1(res)
    key = "max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(res.items()))
    ranges = ", ".join(f"{c} ∈ {int(eq[c].min())}..{int(eq[c].max())}" for c in ("E", "m", "d_in", "d_out") if c in eq)
    ev = [f"- Max relative output residual (TalkLoRA with T = I vs MoELoRA-code with the same A, C, B, "
          f"W_r), over random configurations ({ranges}): "
          + "; ".join(f"{d}: {fmt(r)} over {n_cfg.get(d, 0)} configurations" for d, r in sorted(res.items()))]
    return Outcome(verdict, reason, key, ev)


def evaluate_c2(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C2.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    absorb, ident = max_residuals(eq, "C2_absorption"), max_residuals(eq, "C1_identity_talk")
    verdict, reason = verdict_c2(absorb, ident)
    c9_verdict = verdicts.get("C9")
    c9 = f" (C9 verdict on these data: **{c9_verdict}**)" if c9_verdict else ""
    statement = ("As function classes, TalkLoRA with a linear Talking Module equals MoELoRA-code "
                 "(absorption W' = W_r(T⊗I_m) one way, T = I the other); it is not a strict "
                 "generalisation. 'Strictly' can only hold as a statement about the parameterisation "
                 "(different gradients / optimisation trajectory from the same function), which is "
                 f"what C9 tests{c9}.")
    key = "absorption max residual " + ", ".join(f"{d} {fmt(r)}" for d, r in sorted(absorb.items()))
    n = configurations(eq, "C2_absorption")
    ev = [f"- Absorption map W' = W_r(T⊗I_m), official-init T, W_r scaled ×4, B ~ N(0, 1): max relative "
          f"residual " + "; ".join(f"{d}: {fmt(r)} over {n.get(d, 0)} configurations" for d, r in sorted(absorb.items())),
          f"- Identity map (C1): max residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(ident.items()))]
    return Outcome(verdict, reason, key, ev, statement=statement)


def evaluate_c3(data: dict, config: dict, verdicts: dict) -> Outcome:
    """Apply the rule declared in ``C3.rule`` (below) to the saved rows."""
    eq = data["equivalence"]
    incl = max_residuals(eq, "C3_inclusion")
    vals = centred_values(eq)
    mins = {m: float(vals[m].min()) if len(vals[m]) else math.nan for m in C3_CENTRED}
    maxs = {m: float(vals[m].max()) if len(vals[m]) else math.nan for m in C3_ZERO}
    n_cfg = len(vals[C3_CENTRED[0]])
    verdict, reason = verdict_c3(incl, mins, maxs, n_cfg)
    key = (f"inclusion max {', '.join(f'{d} {fmt(r)}' for d, r in sorted(incl.items()))}; "
           f"centred residual min {fmt(mins[C3_CENTRED[0]])}, output gap (B ≠ 0) min {fmt(mins[C3_CENTRED[1]])}")
    ref = vals["C3_centred_residual_reference"]
    counter = eq[eq.metric == "C3_counterexample_rowspace_residual"].value
    ev = [f"- Inclusion MoELoRA-code(W') = MoELoRA-input(W_g = W'A) applied to absorbed TalkLoRA layers: "
          f"max relative residual " + "; ".join(f"{d}: {fmt(r)}" for d, r in sorted(incl.items()))
          + f"; centred row-space residual of W_r(T⊗I)A in A: max {fmt(maxs['C3_inclusion_centred_residual'])}",
          f"- Not conversely, on centred rows (I − J/E)W_g (softmax ignores a common logit shift) with B ≠ 0, "
          f"over {n_cfg} random configurations (float64): centred row-space residual of a random input router "
          f"min {fmt(mins[C3_CENTRED[0]])}, median {fmt(float(vals[C3_CENTRED[0]].median()) if n_cfg else math.nan)} "
          f"(reference √((d_in − r)/d_in): median {fmt(float(ref.median()) if len(ref) else math.nan)}); relative "
          f"output gap to the best code router with the same experts min {fmt(mins[C3_CENTRED[1]])} "
          f"(B = 0: max {fmt(maxs['C3_best_code_output_residual_B0'])}, every router gives the same function).",
          f"- Why centre: a code router plus a common shift 1vᵀ has plain row-space residual "
          f"{fmt(float(vals['C3_shift_only_plain_residual'].median()) if 'C3_shift_only_plain_residual' in vals else math.nan)} "
          f"but centred residual ≤ {fmt(maxs['C3_shift_only_centred_residual'])} and identical gates "
          f"(max gate gap {fmt(maxs['C3_shift_only_gate_residual'])}).",
          f"- Supplementary (not in the verdict; uncentred rows, B = 0 construction): {len(counter)} constructed "
          f"counterexamples, plain row-space residual min {fmt(float(counter.min()) if len(counter) else math.nan)}.",
          "- Condition: 'not conversely' is with the same experts (A, C_e, B_e) and d_in > r; a MoELoRA-input "
          "router whose centred rows leave rowspace(A) reads directions of x the code h = Ax never sees."]
    return Outcome(verdict, reason, key, ev)


# ----------------------------------------------------------------------------- F6 equivalence residuals
F6_LABELS = {"C1_identity_talk": "C1\nT = I ⇒ MoELoRA", "C2_absorption": "C2\nabsorb T into W_r",
             "C3_inclusion": "C3\ncode ⊆ input router"}
F6_CENTRED = {"C3_centred_residual_random_input_router": "centred\nrow-space\nresidual",
              "C3_best_code_output_residual": "output gap\nbest code\nrouter, B≠0",
              "C3_shift_only_plain_residual": "shift only:\nplain",
              "C3_shift_only_centred_residual": "shift only:\ncentred"}


def prepare_f6(equivalence: pd.DataFrame) -> pd.DataFrame:
    """Every residual row as measured (one point per configuration and dtype)."""
    cols = [c for c in ("seed", "config", "E", "m", "d_in", "d_out", "dtype", "centred", "metric", "value")
            if c in equivalence]
    return equivalence[cols].reset_index(drop=True)


F6_ZERO = 1e-18       # exact zeros only; every non-zero residual is drawn at its value


def draw_f6(data: pd.DataFrame):
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(WIDTH, 3.4), gridspec_kw={"width_ratios": [2.2, 2]})
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
    ax.set_xticks(range(len(metrics)), [F6_LABELS[m] for m in metrics], fontsize=7.5)
    ax.set_ylabel("relative max-abs output residual\nmax|Δy| / max|y|")
    ax.set_title("Exact reparameterisations (random configs)", fontsize=9.5)
    if ((data["value"] == 0) & data["metric"].isin(metrics)).any():
        ax.axhline(F6_ZERO, color="0.5", ls=":", lw=0.8, label=f"exact 0 (drawn at {F6_ZERO:g})")
    cen = data[data["metric"].isin(list(F6_CENTRED))]
    if len(cen):
        names = [m for m in F6_CENTRED if m in set(cen["metric"])]
        for k, m in enumerate(names):
            v = cen[cen["metric"] == m]["value"].to_numpy(float)
            ax2.scatter(k + rng.uniform(-0.15, 0.15, len(v)), np.where(v > 0, v, F6_ZERO), s=12, alpha=0.7,
                        color="#2ca02c" if k < 2 else "0.45", edgecolor="none")
        ref = data[data["metric"] == "C3_centred_residual_reference"]["value"]
        if len(ref):
            ax2.plot([-0.3, 0.3], [ref.median()] * 2, color="k", lw=1.2, ls="--", label="√((d_in − r)/d_in)")
        ax2.axhline(COUNTEREXAMPLE_MIN, color="#d62728", lw=0.9, ls=":", label=f"verdict threshold {COUNTEREXAMPLE_MIN:g}")
        ax2.set_yscale("log")
        ax2.set_ylim(F6_ZERO / 3, 3)
        ax2.set_xticks(range(len(names)), [F6_CENTRED[m] for m in names], fontsize=7)
        ax2.set_ylabel("relative residual (> 0: input router\nnot representable by a code router)")
        ax2.legend(fontsize=7, loc="lower left", framealpha=0.9)
    else:
        empty(ax2)
        ax2.set_xticks([])
    ax2.set_title("input ⊄ code: centred rows, B ≠ 0 (float64)", fontsize=9.5)
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
    evaluate=evaluate_c2, uses_verdicts=("C9",), also_gated_by=C1.tests)
C3 = ClaimSpec(
    "C3", paper="TalkLoRA ⊆ MoELoRA-input, not conversely",
    statement=("Every TalkLoRA (and MoELoRA-code) layer equals a MoELoRA-input layer with "
               "W_g = W_r(T⊗I)A; a MoELoRA-input layer whose router rows are not in rowspace(A) has "
               "no TalkLoRA equivalent with the same experts."),
    rule=("on centred router rows (I − J/E)W (shift-invariant, as softmax is) with B ≠ 0, over random "
          "configurations: holds if `C3_inclusion` ≤ tol for every dtype, `C3_inclusion_centred_residual` "
          "≤ 1e-9, and in every configuration both `C3_centred_residual_random_input_router` and "
          "`C3_best_code_output_residual` (B ≠ 0) are > 1e-3; refuted if an inclusion residual exceeds its "
          "tolerance; inconclusive if some random input router is representable (≤ 1e-3), if a residual that "
          "is 0 by construction (shift-only centred / gate residual, B = 0 output gap) exceeds 1e-9, if the "
          "centred rows are missing, or if a backing test failed."),
    figures=("F6",), tests=(r"tests/test_properties\.py::test_c3_", r"tests/test_properties\.py::test_counterexample_"),
    experiments=("equivalence",), evaluate=evaluate_c3)

F6 = FigureSpec(
    "F6", "equivalence_residuals", ("equivalence",), prepare_f6, draw_f6, notebook="03_equivalence.py", caption_text=
    "Equivalence maps ({claims}) on random configurations. Left: relative output residual of identity-T "
    "TalkLoRA vs MoELoRA (C1), absorbing T into the router (C2) and the code router as an input router (C3), "
    "one point per configuration in float32/float64, with machine ε for reference (exact zeros drawn at "
    "1e-18); each verdict needs the largest residual within its dtype's tolerance (float64 1e-12, float32 "
    "1e-5). Right: C3's 'not conversely' on centred router rows (I − J/E)W (softmax ignores a common logit "
    "shift) with B ≠ 0, float64: the centred row-space residual of a random input router (dashed: its "
    "typical size √((d_in − r)/d_in)) and the output gap to the best code router with the same experts, "
    "both of which must exceed the verdict threshold 1e-3 (red dotted) in every configuration; grey: a "
    "code router plus a common shift, non-zero uncentred but 0 once centred.")

CLAIMS = (C1, C2, C3)
FIGURES = (F6,)
