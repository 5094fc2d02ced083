"""Figures F1–F12 (declared in the claim modules of analysis.claims, drawn by analysis.figures) on small
synthetic result tables: the analytic sweeps here, the settings' sweeps (planted, MiniLM topic, SmolLM2)
from tests/claims_frames.py."""
from __future__ import annotations

import io
import itertools
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from analysis import figures as F  # noqa: E402
from analysis.config import load_profile  # noqa: E402
from analysis import plotting as P  # noqa: E402
from analysis import stats as S  # noqa: E402
from analysis import methods  # noqa: E402
from analysis.claims import (amplification, balance, churn, efficiency, evidence, forest, init_norms,  # noqa: E402
                             lipschitz, structures, topk, twins)
from claims_frames import setting  # noqa: E402

MARGINS: dict = {}

LAYERS = ["L5.query", "L5.value"]
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- synthetic rows
REF, CODE, TWIN, SCALED, DS = "talklora-official", "moelora-code", "moelora-twin", "moelora-code-scaled", \
    "talklora-doubly-stochastic"
SETTING_MEANS = {"head-only": {"loss": 1.0, "accuracy": 0.5}, "lora": {"loss": 0.6, "params": 1010},
                 CODE: {"loss": 0.55, "params": 990, "gini": 0.2}, REF: {"loss": 0.45, "gini": 0.1, "churn": 0.05},
                 TWIN: {"loss": 0.5}, SCALED: {"loss": 0.5}, DS: {"loss": 0.46, "ratio": 0.9},
                 "talklora-broadcast": {"loss": 0.47, "ratio": 0.8}}
BUDGET = {m: SETTING_MEANS[m] for m in (REF, "lora", CODE)}


def planted_sweeps() -> dict:
    return setting("planted", SETTING_MEANS, budgets={"24": BUDGET, "32": BUDGET})


def train_sweeps() -> dict:
    """MiniLM topic: the setting's rows plus the trained routers' Lipschitz sandwich (step −1)."""
    data = setting("train", {m: v for m, v in SETTING_MEANS.items() if m != "talklora-broadcast"},
                   budgets={"8": BUDGET, "32": BUDGET})
    rows = [dict(task="topic", method=m, seed=s, lr=0.01, step=-1, split="test", layer=layer, domain="all",
                 kind="lipschitz_input", statistic=stat, metric="lipschitz", value=v)
            for m in (CODE, REF) for s in range(8) for layer in LAYERS
            for stat, v in (("certified", 0.4), ("local_max", 0.2), ("empirical", 0.19))]
    data["train"] = pd.concat([data["train"], pd.DataFrame(rows)], ignore_index=True)
    return data


def lm_sweeps() -> dict:
    return setting("lm", {"base": {"loss": 3.0}, "lora": {"loss": 2.6}, CODE: {"loss": 2.5}, REF: {"loss": 2.4},
                          TWIN: {"loss": 2.45}, SCALED: {"loss": 2.45}})


def synthetic_rows() -> pd.DataFrame:
    rows = []
    for E, talk, s in itertools.product((4, 8), ("identity", "official", "uniform-mix:0.5"), SEEDS):
        base = dict(E=E, r=32, talk=talk, seed=s, layer="layer", n_tokens=64)
        for kind, eps, stat in itertools.product(P.KIND_LABELS, (0.01, 0.1), ("median", "p95", "max")):
            rows.append(dict(base, kind=kind, eps=eps, metric="routing_quotient", statistic=stat,
                             value=0.01 * (1 + s) * (2 if stat == "p95" else 1)))
            rows.append(dict(base, kind=kind, eps=eps, metric="top1_flip_rate", statistic="mean", value=0.1))
        for wrt, (stat, v) in itertools.product(("code", "input"), (("certified", 0.3), ("local_max", 0.2),
                                                                     ("empirical", 0.15))):
            rows.append(dict(base, kind=f"lipschitz_{wrt}", eps=0.0, metric="lipschitz", statistic=stat, value=v))
        rows.append(dict(base, kind="talk", eps=0.0, metric="talk_norm", statistic="value", value=1.0))
    return pd.DataFrame(rows)


def router_rows() -> pd.DataFrame:
    rows = []
    for router, s in itertools.product(("dense", "top2", "top1"), SEEDS):
        base = dict(router=router, seed=s, layer="layer", n_tokens=64)
        for eps in (0.01, 0.1):
            for kind in ("gaussian_input", "adversarial"):
                rows.append(dict(base, kind=kind, eps=eps, metric="top1_flip_rate", statistic="mean", value=eps * 2))
            rows.append(dict(base, kind="gaussian_input", eps=eps, metric="topk_set_flip_rate", statistic="mean",
                             value=0.0 if router == "dense" else eps))
            for kind, stat in itertools.product(("gaussian_input", "adversarial"), ("median", "max")):
                q = 0.1 * (1 + s) * (1 if router == "dense" else 2 if stat == "max" else 0.5)
                rows.append(dict(base, kind=kind, eps=eps, metric="routing_quotient", statistic=stat, value=q))
        rows += [dict(base, kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic="local_median", value=0.1),
                 dict(base, kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic="local_max", value=0.2),
                 dict(base, kind="lipschitz_code", eps=0.0, metric="certified_exists", statistic="value",
                      value=float(router == "dense"))]
        if router == "dense":
            rows.append(dict(base, kind="lipschitz_code", eps=0.0, metric="lipschitz", statistic="certified", value=0.3))
    return pd.DataFrame(rows)


def control_rows() -> pd.DataFrame:
    """perturb_controls-like rows: the spectral control's median quotient is 0.8× the talk setting's."""
    syn = synthetic_rows()
    q = syn[(syn.metric == "routing_quotient")]
    return pd.concat([q.assign(control="spectral", value=q["value"] / 0.8),
                      q.assign(control="frobenius", value=q["value"])], ignore_index=True)


def talk_norm_rows() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for E in (2, 4, 8):
        v = rng.uniform(0.5, 0.5 + E / 4, 200)
        rows += [dict(E=E, seed=0, draw=i, metric="talk_norm", value=x) for i, x in enumerate(v)]
        rows += [dict(E=E, seed=0, draw=i, metric="certified_ratio", value=x / 2) for i, x in enumerate(v)]
    return pd.DataFrame(rows)


def equivalence_rows() -> pd.DataFrame:
    rows = []
    for i, dtype in itertools.product(range(5), ("float32", "float64")):
        info = dict(seed=0, config=i, E=2, m=2, d_in=8, d_out=4, dtype=dtype)
        tiny = 1e-7 if dtype == "float32" else 1e-16
        rows += [dict(info, metric=m, value=0.0 if i == 0 else tiny)
                 for m in ("C1_identity_talk", "C2_absorption", "C3_inclusion")]
        if dtype == "float64":
            rows.append(dict(info, metric="C3_counterexample_rowspace_residual", value=0.7))
    return pd.DataFrame(rows)


def twin_rows() -> pd.DataFrame:
    rows = []
    for opt, s, step, model in itertools.product(("adamw", "sgd"), (0, 1), (0, 2, 4), methods.tagged("twin-arm")):
        base = dict(optimizer=opt, seed=s, step=step, model=model)
        d = 0.0 if model == "talklora-official" else 1e-3 * step
        rows += [dict(base, layer="all", metric="logit_maxabs_diff", value=d),
                 dict(base, layer="all", metric="logit_meanabs_diff", value=d / 10),
                 dict(base, layer="all", metric="accuracy", value=0.5 + (0.01 * step if model == "moelora-twin" else 0)),
                 dict(base, layer="L5.query", metric="gini", value=0.1),
                 dict(base, layer="L5.value", metric="gini", value=0.2 + (0.01 if model != "talklora-official" else 0))]
    return pd.DataFrame(rows)


ROWS = {"perturb_synthetic": synthetic_rows, "perturb_routers": router_rows, "talk_norms": talk_norm_rows,
        "equivalence": equivalence_rows, "twins": twin_rows, "perturb_controls": control_rows,
        "perturb_real": lambda: synthetic_rows().assign(model="minilm").drop(columns=["E", "r"]),
        **{name: (lambda name=name, make=make: make()[name]) for make in (planted_sweeps, train_sweeps, lm_sweeps)
           for name in make()}}


@pytest.fixture(autouse=True)
def _close_figures():
    F.set_style()
    yield
    plt.close("all")


def _drawn(fig) -> bool:
    """Some axes hold lines, collections, patches or images."""
    return any(ax.lines or ax.collections or ax.patches or ax.images for ax in fig.axes)


def _roundtrip(df: pd.DataFrame) -> pd.DataFrame:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    buf.seek(0)
    return pd.read_csv(buf)


# ----------------------------------------------------------------------------- helpers
def test_summarise_t_interval():
    df = pd.DataFrame({"g": ["a"] * 3 + ["b"], "value": [1.0, 2.0, 3.0, 5.0]})
    out = P.summarise(df, ["g"]).set_index("g")
    half = S.t_quantile(2) * 1.0 / math.sqrt(3)
    assert out.loc["a", "mean"] == pytest.approx(2.0)
    assert out.loc["a", "lo"] == pytest.approx(2.0 - half) and out.loc["a", "hi"] == pytest.approx(2.0 + half)
    assert out.loc["b", "lo"] == out.loc["b", "hi"] == 5.0 and out.loc["b", "n"] == 1
    assert S.t_quantile(1) == pytest.approx(12.7062, abs=1e-4) and S.t_quantile(1000) == pytest.approx(1.9623, abs=1e-4)


# ----------------------------------------------------------------------------- each figure
CASES = {
    "F1": {"source", "metric", "layer", "method", "mean", "lo", "hi", "n"},
    "F2": {"panel", "E", "kind", "talk", "statistic", "eps", "mean", "lo", "hi", "n"},
    "F3": {"panel", "E", "group", "statistic", "mean", "lo", "hi", "n"},
    "F4": {"source", "split", "metric", "method", "step", "mean", "lo", "hi", "n"},
    "F5": {"source", "budget", "method", "metric", "trainable_parameters", "mean", "lo", "hi", "n"},
    "F6": {"dtype", "metric", "value"},
    "F7": {"metric", "E", "median", "q25", "q75", "frac_gt_1", "share", "share_lo", "share_hi", "n"},
    "F8": {"panel", "optimizer", "model", "metric", "step", "mean", "lo", "hi", "n"},
    "F9": {"panel", "router", "kind", "eps", "statistic", "mean", "lo", "hi", "n"},
    "F10": {"claim", "comparison", "setting", "controls", "deciding", "n", "effect", "ci_low", "ci_high", "margin",
            "verdict"},
    "F11": {"source", "method", "step", "mean", "lo", "hi", "n"},
    "F12": {"source", "metric", "method", "mean", "lo", "hi", "n"},
}


def test_every_figure_has_a_case():
    assert set(CASES) == {f.id for f in F.FIGURES}


@pytest.mark.parametrize("fig_id", sorted(CASES, key=lambda f: int(f[1:])))
def test_figure_draws_and_redraws_from_its_data(fig_id):
    columns = CASES[fig_id]
    spec = F.FIGURE_BY_ID[fig_id]
    fig, data = spec.make(*(ROWS[e]() if e in ROWS else None for e in spec.reads), config=MARGINS)
    assert isinstance(fig, matplotlib.figure.Figure) and _drawn(fig)
    assert columns <= set(data.columns), columns - set(data.columns)
    assert len(data) > 0 and len(data) < 5000
    again = spec.draw(_roundtrip(data))            # what the notebooks do
    assert _drawn(again)


@pytest.mark.parametrize("fig_id", ["F1", "F4", "F5", "F11", "F12"])
def test_settings_figures_draw_whatever_settings_ran(fig_id):
    """A setting that did not run is absent from the figure, never an error."""
    spec = F.FIGURE_BY_ID[fig_id]
    only_planted = {e: ROWS[e]() for e in spec.reads if e.startswith("planted")}
    fig, data = spec.make(*(only_planted.get(e) for e in spec.reads))
    assert set(data["source"]) == {"planted-teacher"} and _drawn(fig)


def test_f1_values_are_seed_means_of_the_final_validation_step_that_c6_reads():
    rows = train_sweeps()["train"]
    rows.loc[(rows["split"] == "val") & (rows["step"] == 0) & (rows["metric"] == "gini"), "value"] = 0.9   # not drawn
    data = balance.prepare_f1(None, rows, None).set_index(["metric", "layer", "method"])
    assert set(data.index.get_level_values("method")) <= set(balance.f1_methods())   # LoRA has no router
    end = evidence.routing(evidence.runs({"train": rows})[0], "gini")["end"]
    for m in (CODE, REF, TWIN):
        assert data.loc[("gini", "L0", m), "mean"] == pytest.approx(end[m].mean()) and data.loc[("gini", "L0", m), "n"] == 8


def test_f2_medians_and_p95_by_talk():
    data = amplification.prepare_f2(synthetic_rows(), control_rows())
    quot = data[data["panel"] == "quotient"]
    assert set(quot["statistic"]) == {"median", "p95"} and set(quot["talk"]) == {"identity", "official", "uniform-mix:0.5"}
    med = quot[(quot["statistic"] == "median")]["mean"]
    assert med.to_numpy() == pytest.approx(0.02)       # mean of 0.01, 0.02, 0.03 over seeds


def test_f2_ratio_to_the_scale_matched_controls():
    data = amplification.prepare_f2(synthetic_rows(), control_rows())
    ratio = data[data["panel"].str.startswith("ratio/")].set_index(["panel", "talk", "kind", "eps"])
    assert ratio.xs("ratio/spectral")["mean"].to_numpy() == pytest.approx(0.8)      # control quotient / 0.8
    assert ratio.xs("ratio/frobenius")["mean"].to_numpy() == pytest.approx(1.0)
    assert (ratio["n"] == len(SEEDS)).all()


def test_f3_orders_alpha_grid_and_includes_trained():
    data = lipschitz.prepare_f3(synthetic_rows(), train_sweeps()["train"])
    assert set(data["panel"]) == {"synthetic, w.r.t. code", "synthetic, w.r.t. input", "trained routers, w.r.t. input"}
    assert P.talk_order(["official", "identity", "uniform-mix:0.75", "uniform-mix:0.25"]) == [
        "uniform-mix:0.25", "uniform-mix:0.75", "identity", "official"]
    trained = data[data["panel"].str.startswith("trained")]
    assert set(trained["group"]) == {CODE, REF} and (trained["n"] == 16).all()     # 8 seeds x 2 layers
    assert set(lipschitz.prepare_f3(synthetic_rows())["panel"]) == {"synthetic, w.r.t. code", "synthetic, w.r.t. input"}


def test_f4_averages_layers_then_seeds_on_the_split_each_setting_records():
    data = balance.prepare_f4(planted_sweeps()["planted"], None, lm_sweeps()["lm"])
    data = data.set_index(["source", "metric", "method", "step"])
    planted = data.loc[("planted-teacher", "gini", REF)]
    assert list(planted.index) == [0, 100] and planted.loc[100, "n"] == 8
    assert planted.loc[100, "mean"] == pytest.approx(0.1, abs=0.01)
    assert set(data.loc["smollm2-lm"].reset_index()["metric"]) == {"gini", "load_entropy", "token_entropy"}


def test_f5_loss_and_parameters_per_budget():
    sweeps = planted_sweeps()
    data = efficiency.prepare_f5(sweeps["planted"], sweeps["planted_budget"]).set_index(["budget", "method", "metric"])
    assert data.loc[("main sweep", "lora", "loss"), "trainable_parameters"] == 1010
    assert data.loc[("24", REF, "loss"), "mean"] == pytest.approx(0.46, abs=0.01) and data.loc[("24", REF, "loss"), "n"] == 8
    assert "accuracy" not in set(data.index.get_level_values("metric"))          # regression: no accuracy


def test_f12_puts_every_structure_beside_the_reference():
    data = structures.prepare_f12(planted_sweeps()["planted"]).set_index(["metric", "method"])
    assert {DS, "talklora-broadcast", REF, CODE} <= set(data.index.get_level_values("method"))
    assert "lora" not in set(data.index.get_level_values("method"))
    assert data.loc[("certified_ratio", DS), "mean"] == pytest.approx(0.9)
    assert data.loc[("loss", DS), "n"] == 8
    assert structures.prepare_f12(setting("planted", {REF: {}, CODE: {}})["planted"]).empty   # no structure: no panel


def test_f10_marks_comparisons_that_are_not_testable():
    flat = setting("lm", {"base": {"loss": 1.0}, "lora": {"loss": 0.99}, CODE: {"loss": 0.99}, REF: {"loss": 0.99},
                          TWIN: {"loss": 0.99}, SCALED: {"loss": 0.99}})
    spec = F.FIGURE_BY_ID["F10"]
    rows = {**planted_sweeps(), **flat}
    data = spec.prepare(*(rows.get(e) for e in spec.reads))
    lm = data[data["setting"] == "smollm2-lm"]
    assert len(lm) and (lm["verdict"] == "not-testable").all() and lm["controls"].str.startswith("failed: P1").all()
    assert set(data["claim"]) >= {"C5", "C6", "C7", "C9", "C11", "C12", "C13"}
    fig = forest.draw_f10(data)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("not testable") for t in labels)


def test_f7_fraction_above_one():
    rows = talk_norm_rows()
    data = init_norms.prepare_f7(rows).set_index(["metric", "E"])
    expected = (rows[(rows.metric == "talk_norm") & (rows.E == 8)]["value"] > 1).mean()
    assert data.loc[("talk_norm", 8), "frac_gt_1"] == pytest.approx(expected)
    assert data.loc[("talk_norm", 8), "n"] == 200


def test_f8_gaps_are_relative_to_talklora():
    data = twins.prepare_f8(twin_rows())
    assert "talklora-official" not in set(data["model"])
    acc = data[(data["metric"] == "accuracy_gap") & (data["step"] == 4)].set_index(["optimizer", "model"])
    assert acc.loc[("adamw", "moelora-twin"), "mean"] == pytest.approx(0.04)
    assert acc.loc[("adamw", "talklora-identity-matched"), "mean"] == pytest.approx(0.0)
    gini = data[(data["metric"] == "gini_gap")]
    assert gini["mean"].to_numpy() == pytest.approx(0.005)


def test_f9_certified_missing_for_topk():
    data = topk.prepare_f9(router_rows())
    lip = data[data["panel"] == "lipschitz"]
    assert set(lip[lip["statistic"] == "certified"]["router"]) == {"dense"}
    assert set(data["panel"]) == set(topk.F9_PANELS) | {"lipschitz"}


def test_f9_relative_quotient_per_eps_and_statistic():
    data = topk.prepare_f9(router_rows())
    rel = data[data["panel"].str.startswith("quotient_rel")].set_index(["panel", "router", "kind", "eps"])
    assert rel.xs("quotient_rel/max")["mean"].to_numpy() == pytest.approx(1.0)        # (2q − q)/q
    assert rel.xs("quotient_rel/median")["mean"].to_numpy() == pytest.approx(-0.5)    # (q/2 − q)/q
    assert len(rel.xs("quotient_rel/max")) == 2 * 2 * 2                             # router × kind × ε


def test_f11_churn_per_setting_method_and_step():
    data = churn.prepare_f11(planted_sweeps()["planted"], None, lm_sweeps()["lm"]).set_index(["source", "method", "step"])
    assert data.loc[("planted-teacher", REF, 50), "mean"] == pytest.approx(0.05, abs=0.01)
    assert set(data.index.get_level_values("source")) == {"planted-teacher", "smollm2-lm"}
    assert (data["n"] == 8).all() and "lora" not in set(data.index.get_level_values("method"))


# ----------------------------------------------------------------------------- pipeline
def _write_results(root):
    for name, make in ROWS.items():
        (root / name).mkdir(parents=True)
        make().to_csv(root / name / "rows.csv", index=False)


def test_draw_all_writes_images_data_and_manifest(tmp_path):
    _write_results(tmp_path / "results")
    out = tmp_path / "figs"
    written = F.draw_all(tmp_path / "results", out, log=lambda _: None, config=MARGINS)
    assert set(written) == {f.id for f in F.FIGURES}
    readme = (out / "README.md").read_text()
    for f in F.FIGURES:
        for path in (out / f"{f.name}.png", out / f"{f.name}.pdf", out / "data" / f"{f.name}.csv"):
            assert path.is_file() and path.stat().st_size > 0
        assert f"{f.name}.png" in readme and f"data/{f.name}.csv" in readme and f.notebook in readme
        assert f"module: `{f.draw.__module__}`" in readme and f.caption in readme
    assert not list(out.rglob("*.tmp"))
    assert plt.get_fignums() == []                     # every figure closed


def test_draw_all_leaves_out_settings_that_did_not_run(tmp_path):
    root = tmp_path / "results"
    for name, make in ROWS.items():
        if not name.startswith(("train", "lm")):
            (root / name).mkdir(parents=True)
            make().to_csv(root / name / "rows.csv", index=False)
    F.draw_all(root, tmp_path / "figs", only=["F1", "F12"], log=lambda _: None)
    data = pd.read_csv(tmp_path / "figs" / "data" / f"{F.FIGURE_BY_ID['F1'].name}.csv")
    assert set(data["source"]) == {"planted-teacher"}


def test_missing_experiment_names_it_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'twins'.*python -m analysis twins --results-dir {tmp_path}"):
        F.load_experiment("twins", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'talk_norms'.*python -m analysis perturb"):
        F.draw_all(tmp_path, tmp_path / "figs", only=["F7"])


def test_run_ensures_results_with_the_same_arguments(tmp_path, monkeypatch):
    from analysis import lm, perturb, planted, train, twins
    calls = []
    for mod in (perturb, train, twins, lm, planted):
        monkeypatch.setattr(mod, "run", lambda config, mod=mod, **kw: calls.append((mod.__name__, config, kw)))
    monkeypatch.setattr(F, "draw_all", lambda results_dir, figures_dir, config: calls.append(
        ("draw", results_dir, figures_dir, config)))
    cfg = load_profile("quick")
    F.run(cfg, results_dir=tmp_path / "results", workers=3, force=True, figures_dir=tmp_path / "figs")
    assert [c[0] for c in calls] == ["analysis.perturb", "analysis.train", "analysis.twins", "analysis.lm",
                                     "analysis.planted", "draw"]
    assert all(c[1] is cfg and c[2] == dict(results_dir=tmp_path / "results", workers=3, executor=None,
                                            force=True) for c in calls[:5])
    assert calls[5] == ("draw", tmp_path / "results", tmp_path / "figs", cfg.to_dict())
