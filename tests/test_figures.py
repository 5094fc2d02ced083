"""Figures F1–F11 (declared in the claim modules of analysis.claims, drawn by analysis.figures) on small
synthetic result tables."""
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
from analysis.claims import amplification, balance, churn, efficiency, init_norms, lipschitz, topk, twins  # noqa: E402
from test_claims import MARGINS  # noqa: E402

METHODS = ["lora", "moelora-code", "moelora-input", "talklora-official", "talklora-identity"]
LAYERS = ["L5.query", "L5.value"]
SEEDS = [0, 1, 2]


# ----------------------------------------------------------------------------- synthetic rows
def train_rows() -> pd.DataFrame:
    rows = []
    for m, s in itertools.product(METHODS, SEEDS):
        base = dict(method=m, seed=s, domain="all")
        for step in (0, 5, 10):
            rows.append(dict(base, step=step, split="val", layer="all", metric="accuracy", value=0.5 + step / 100))
            if m != "lora":
                for i, layer in enumerate(LAYERS):
                    for metric, v in (("gini", 0.1 * (i + 1) + 0.01 * s), ("load_entropy", 0.9),
                                      ("token_entropy", 0.8)):
                        rows.append(dict(base, step=step, split="val", layer=layer, metric=metric, value=v))
        rows.append(dict(base, step=10, split="test", layer="all", metric="accuracy", value=0.6 + 0.01 * s))
        rows.append(dict(base, step=10, split="test", layer="all", domain="movie", metric="accuracy", value=0.1))
        rows.append(dict(base, step=10, split="test", layer="all", metric="trainable_parameters",
                         value=1000.0 * (METHODS.index(m) + 1)))
        if m != "lora":
            for i, layer in enumerate(LAYERS):
                rows += [dict(base, step=10, split="test", layer=layer, metric="gini", value=0.1 * (i + 1) + 0.01 * s),
                         dict(base, step=10, split="test", layer=layer, metric="load_entropy", value=0.95)]
                for stat, v in (("certified", 0.4), ("local_max", 0.2), ("empirical", 0.19)):
                    rows.append(dict(base, step=-1, split="test", layer=layer, kind="lipschitz_input",
                                     statistic=stat, metric="lipschitz", value=v))
    return pd.DataFrame(rows)


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


def churn_train_rows() -> pd.DataFrame:
    """train rows plus probe churn (task 'sentiment'): TalkLoRA churns 0.05, the MoELoRA-code methods 0.1."""
    rows = []
    for m, s, step, layer in itertools.product(("talklora-official", "moelora-code", "moelora-code-scaled"), SEEDS,
                                              (5, 10), LAYERS):
        rows.append(dict(task="sentiment", method=m, seed=s, step=step, split="probe", layer=layer, domain="all",
                         metric="churn", value=0.05 if m == "talklora-official" else 0.1))
    return pd.concat([train_rows().assign(task="sentiment"), pd.DataFrame(rows)], ignore_index=True)


def lm_churn_rows() -> pd.DataFrame:
    rows = []
    for m, s, step in itertools.product(("lora", "talklora-official", "moelora-code", "moelora-code-scaled"), SEEDS,
                                        (4, 8, 12)):
        if m != "lora":
            rows.append(dict(method=m, seed=s, step=step, split="test", layer="mean", domain="all",
                             metric="top1_churn", value=0.2 / step + 0.01 * s))
    return pd.DataFrame(rows)


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


def budget_rows() -> pd.DataFrame:
    """``train_budget``-like rows: TalkLoRA and LoRA at two more budgets (C7, F5)."""
    rows = []
    for r, m, s in itertools.product((8, 32), ("lora", "talklora-official"), SEEDS):
        base = dict(budget=r, method=m, seed=s, step=10, split="test", layer="all", domain="all", rank=r)
        rows += [dict(base, metric="accuracy", value=0.6 + 0.001 * r + 0.01 * s),
                 dict(base, metric="trainable_parameters", value=100.0 * r)]
    return pd.DataFrame(rows)


def lm_loss_rows() -> pd.DataFrame:
    rows = []
    for m, s in itertools.product(("lora", "moelora-code", "talklora-official"), SEEDS):
        rows += [dict(method=m, seed=s, step=4, split="test", layer="all", domain=d, metric="loss",
                      value=3.0 - 0.01 * s - (0.1 if m == "talklora-official" else 0)) for d in ("movie", "news", "math")]
    return pd.DataFrame(rows)


def lm_rows() -> pd.DataFrame:
    return pd.concat([lm_churn_rows(), lm_loss_rows()], ignore_index=True)


ROWS = {"train": churn_train_rows, "perturb_synthetic": synthetic_rows, "perturb_routers": router_rows,
        "talk_norms": talk_norm_rows, "equivalence": equivalence_rows, "twins": twin_rows,
        "train_budget": budget_rows, "lm": lm_rows, "perturb_controls": control_rows,
        "perturb_real": lambda: synthetic_rows().assign(model="minilm").drop(columns=["E", "r"])}


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
    "F1": (["train"], {"metric", "layer", "method", "mean", "lo", "hi", "n"}),
    "F2": (["perturb_synthetic", "perturb_controls"], {"panel", "E", "kind", "talk", "statistic", "eps", "mean", "lo",
                                                       "hi", "n"}),
    "F3": (["perturb_synthetic", "train"], {"panel", "E", "group", "statistic", "mean", "lo", "hi", "n"}),
    "F4": (["train"], {"metric", "method", "step", "mean", "lo", "hi", "n"}),
    "F5": (["train", "train_budget"], {"task", "budget", "method", "trainable_parameters", "mean", "lo", "hi", "n"}),
    "F6": (["equivalence"], {"dtype", "metric", "value"}),
    "F7": (["talk_norms"], {"metric", "E", "median", "q25", "q75", "frac_gt_1", "share", "share_lo", "share_hi", "n"}),
    "F8": (["twins"], {"panel", "optimizer", "model", "metric", "step", "mean", "lo", "hi", "n"}),
    "F9": (["perturb_routers"], {"panel", "router", "kind", "eps", "statistic", "mean", "lo", "hi", "n"}),
    "F11": (["lm", "train"], {"source", "method", "step", "mean", "lo", "hi", "n"}),
    "F10": (list(F.FIGURE_BY_ID["F10"].experiments), {"claim", "comparison", "n", "effect", "ci_low", "ci_high",
                                                      "margin", "verdict"}),
}


@pytest.mark.parametrize("fig_id", sorted(CASES))
def test_figure_draws_and_redraws_from_its_data(fig_id):
    experiments, columns = CASES[fig_id]
    spec = F.FIGURE_BY_ID[fig_id]
    assert tuple(experiments) == spec.experiments
    fig, data = spec.make(*(ROWS[e]() for e in experiments), config=MARGINS)
    assert isinstance(fig, matplotlib.figure.Figure) and _drawn(fig)
    assert columns <= set(data.columns), columns - set(data.columns)
    assert len(data) > 0 and len(data) < 5000
    again = spec.draw(_roundtrip(data))            # what the notebooks do
    assert _drawn(again)


def test_f1_values_are_seed_means_of_the_final_validation_step():
    rows = train_rows()
    rows.loc[(rows["split"] == "test") & (rows["metric"] == "gini"), "value"] = 0.9      # must not be drawn
    data = balance.prepare_f1(rows).set_index(["metric", "layer", "method"])
    assert set(data.index.get_level_values("method")) <= set(balance.f1_methods())   # LoRA has no router
    assert "lora" not in set(data.index.get_level_values("method"))
    row = data.loc[("gini", "L5.value", "talklora-official")]
    assert row["mean"] == pytest.approx(0.21) and row["n"] == 3 and row["lo"] < 0.21 < row["hi"]


def test_f1_draws_the_final_values_the_c6_verdict_reads():
    """F1's per-layer means, averaged over layers, are the seed means of the layer-mean Gini at the last step
    that C6's difference-in-differences takes (its 'end' frame)."""
    rows = train_rows()
    rows.loc[(rows["split"] == "val") & (rows["step"] == 5) & (rows["metric"] == "gini"), "value"] = 0.9
    drawn = balance.prepare_f1(rows)
    drawn = drawn[drawn["metric"] == "gini"].groupby("method")["mean"].mean()      # mean over layers
    (setting, frames), = balance.select_c6({"train": rows})
    start, end = frames["gini"]
    assert drawn.to_dict() == pytest.approx(end.mean()[drawn.index].to_dict())
    assert start.mean()[drawn.index].to_numpy() == pytest.approx(drawn.to_numpy())   # step 0 = the end here


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
    data = lipschitz.prepare_f3(synthetic_rows(), train_rows())
    assert set(data["panel"]) == {"synthetic, w.r.t. code", "synthetic, w.r.t. input", "trained routers, w.r.t. input"}
    assert P.talk_order(["official", "identity", "uniform-mix:0.75", "uniform-mix:0.25"]) == [
        "uniform-mix:0.25", "uniform-mix:0.75", "identity", "official"]
    trained = data[data["panel"].str.startswith("trained")]
    assert set(trained["group"]) == set(METHODS) - {"lora"} and (trained["n"] == 6).all()     # 3 seeds x 2 layers


def test_f4_averages_layers_then_seeds():
    data = balance.prepare_f4(train_rows()).set_index(["metric", "method", "step"])
    assert data.loc[("gini", "moelora-code", 5), "mean"] == pytest.approx(0.16)   # (0.1 + 0.2)/2 + 0.01
    assert data.loc[("gini", "moelora-code", 5), "n"] == 3


def test_f5_accuracy_and_parameters():
    data = efficiency.prepare_f5(train_rows(), budget_rows()).set_index(["budget", "method"])
    assert data.loc[(0, "lora"), "trainable_parameters"] == 1000 and data.loc[(0, "lora"), "mean"] == pytest.approx(0.61)
    assert data.loc[(32, "talklora-official"), "trainable_parameters"] == 3200
    assert data.loc[(32, "talklora-official"), "mean"] == pytest.approx(0.642) and data.loc[(32, "lora"), "n"] == 3


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


def test_f11_churn_per_source_method_and_step():
    data = churn.prepare_f11(lm_rows(), churn_train_rows()).set_index(["source", "method", "step"])
    assert data.loc[("train: sentiment", "talklora-official", 5), "mean"] == pytest.approx(0.05)
    assert data.loc[("lm (SmolLM2)", "moelora-code", 4), "mean"] == pytest.approx(0.06)    # 0.05 + mean 0.01·s
    assert (data["n"] == len(SEEDS)).all() and "lora" not in set(data.index.get_level_values("method"))


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


def test_missing_experiment_names_it_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"'twins'.*python -m analysis twins --results-dir {tmp_path}"):
        F.load_experiment("twins", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'talk_norms'.*python -m analysis perturb"):
        F.draw_all(tmp_path, tmp_path / "figs", only=["F7"])


def test_run_ensures_results_with_the_same_arguments(tmp_path, monkeypatch):
    from analysis import lm, perturb, train, twins
    calls = []
    for mod in (perturb, train, twins, lm):
        monkeypatch.setattr(mod, "run", lambda config, mod=mod, **kw: calls.append((mod.__name__, config, kw)))
    monkeypatch.setattr(F, "draw_all", lambda results_dir, figures_dir, config: calls.append(
        ("draw", results_dir, figures_dir, config)))
    cfg = load_profile("quick")
    F.run(cfg, results_dir=tmp_path / "results", workers=3, force=True, figures_dir=tmp_path / "figs")
    assert [c[0] for c in calls] == ["analysis.perturb", "analysis.train", "analysis.twins", "analysis.lm", "draw"]
    assert all(c[1] is cfg and c[2] == dict(results_dir=tmp_path / "results", workers=3, executor=None,
                                            force=True) for c in calls[:4])
    assert calls[4] == ("draw", tmp_path / "results", tmp_path / "figs", cfg.to_dict())   # F10: declared margins
