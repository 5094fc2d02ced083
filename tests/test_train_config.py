"""Config of the training experiments: the [train]/[twins] fields, the profiles against the
preregistered protocol, and the separate sentiment/topic task splits."""
import pandas as pd
import pytest

from analysis.config import ConfigError, ExperimentConfig, TrainConfig, TwinsConfig, load_profile

BAD = [
    (TrainConfig, {"tasks": ["sentiment", "news"]}, r"train\.tasks"),
    (TrainConfig, {"tasks": []}, r"train\.tasks"),
    (TrainConfig, {"methods": ["lora"], "extra_methods": ["lora"]}, r"train\.extra_methods"),
    (TrainConfig, {"extra_methods": ["dora"]}, r"train\.extra_methods"),
    (TrainConfig, {"n_probe": 400, "n_val": 300}, r"train\.n_probe"),
    (TrainConfig, {"n_test": 0}, r"train\.n_test"),
    (TrainConfig, {"budget_ranks": [10]}, r"train\.budget_ranks"),            # not a multiple of E = 4
    (TrainConfig, {"budget_ranks": [16]}, r"train\.budget_ranks"),            # = train.rank
    (TrainConfig, {"budget_ranks": [8, 8]}, r"train\.budget_ranks"),
    (TrainConfig, {"budget_methods": ["lora"]}, r"train\.budget_methods"),    # no reference
    (TrainConfig, {"budget_methods": ["talklora-official", "head-only"]}, r"train\.budget_methods"),
    (TrainConfig, {"budget_tasks": ["movies"]}, r"train\.budget_tasks"),
    (TwinsConfig, {"models": ["moelora-twin"]}, r"twins\.models"),
    (TwinsConfig, {"models": ["talklora", "lora"]}, r"twins\.models"),
    (TwinsConfig, {"tasks": ["news"]}, r"twins\.tasks"),
    (TwinsConfig, {"talk_init": "identity"}, r"twins\.talk_init"),
    (TrainConfig, {"seeds": [0, 1], "tuning_seeds": [1, 2]}, r"train\.tuning_seeds"),
    (TrainConfig, {"lr_grid": []}, r"train\.lr_grid"),
    (TrainConfig, {"tie_threshold": 1.5}, r"train\.tie_threshold"),
]


@pytest.mark.parametrize("cls, values, message", BAD, ids=[f"{c.SECTION}-{list(v)[0]}-{i}" for i, (c, v, _) in enumerate(BAD)])
def test_invalid_values_name_the_field(cls, values, message):
    with pytest.raises(ConfigError, match=message):
        cls(**values)


def test_margins_are_not_a_config_section_but_preregistered():
    with pytest.raises(ConfigError, match=r"^margins: unknown top-level key"):
        ExperimentConfig.from_dict({"margins": {"c6_gini": 0.1}})


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_profiles_follow_the_preregistered_protocol(name):
    """Every setting of a profile: >= 8 paired evaluation seeds, tuning seeds disjoint from them, an lr
    grid of >= 3 values, the no-adapter baseline, and the methods of every deciding comparison."""
    from analysis import methods, prereg
    cfg = load_profile(name)
    sections = {"train": cfg.train, "lm": cfg.lm, "planted": cfg.planted}
    for section in sections.values():
        assert len(section.seeds) >= 8 and not set(section.seeds) & set(section.tuning_seeds)
        assert len(section.lr_grid) >= 3
    assert len(cfg.train.head_lr_grid) >= 3 and len(cfg.twins.seeds) >= 8
    assert "head-only" in cfg.train.methods and "head-only" in cfg.planted.methods   # P1 (LM: the base cell)
    reg = prereg.load()
    routed_deciding = {t for c in ("C5", "C6", "C9", "C12") for t in reg.deciding_for(c)}
    for section in sections.values():       # C6 / C9 / C12 controls wherever the reference trains
        trained = set(section.methods) | set(getattr(section, "extra_methods", []))
        assert methods.reference() in trained and set(methods.tagged("baseline")) <= trained
        assert {"function-matched", "scale-matched"} <= {t for m in trained for t in methods.method(m).tags}
    planted = set(cfg.planted.methods)      # C5's control and C13's structure run at least in planted
    assert {t for m in planted for t in methods.method(m).tags} >= routed_deciding
    assert set(reg.deciding_for("C13")) <= planted and set(methods.tagged("structure")) <= planted
    assert len(cfg.planted.budget_ranks) + 1 >= 3              # C7: >= 3 budgets with planted.rank
    assert cfg.train.n_test >= 1000
    assert {"topic"} <= set(cfg.train.tasks) <= {"sentiment", "topic"}
    if name == "paper":
        assert set(cfg.train.tasks) == {"sentiment", "topic"} and len(cfg.train.budget_ranks) + 1 >= 3


# ----------------------------------------------------------------------------- task splits
@pytest.fixture(scope="module")
def frames():
    from analysis.data import load_task
    return {t: load_task(t) for t in ("sentiment", "topic")}


def test_tasks_load_with_their_own_labels(frames):
    from analysis.data import TASKS
    for task, frame in frames.items():
        assert sorted(frame.label.unique()) == list(range(len(TASKS[task])))
        assert frame.id.is_unique and frame.text.is_unique
        assert all(TASKS[task][k] == n for k, n in zip(frame.label, frame.label_name))
    assert len(frames["sentiment"]) > 12_000 and len(frames["topic"]) > 2_000
    # topic text: headline + first paragraph, longer than a bare headline
    assert frames["topic"].text.str.split().str.len().median() > 15


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_task_split_is_exact_stratified_disjoint_and_deterministic(frames, task, tmp_path):
    from analysis.data import make_task_split, task_split
    frame = frames[task]
    a = make_task_split(task, 5000, 250, 1000, seed=1, frame=frame)
    pd.testing.assert_frame_equal(a, make_task_split(task, 5000, 250, 1000, seed=1, frame=frame))
    assert not a.id.equals(make_task_split(task, 5000, 250, 1000, seed=2, frame=frame).id)
    sizes = a.groupby("split").size()
    assert sizes["test"] == 1000 and sizes["val"] == 250
    assert sizes["train"] == min(5000, len(frame) - 1250) and a.id.is_unique
    share = frame.label.value_counts(normalize=True)
    test_share = a[a.split == "test"].label.value_counts(normalize=True)
    assert (test_share - share).abs().max() <= 1 / 1000 + 1e-12    # stratified to one example
    saved = task_split(tmp_path, task, 5000, 250, 1000, seed=1)
    pd.testing.assert_frame_equal(saved.reset_index(drop=True), a.astype(saved.dtypes.to_dict()))
    with pytest.raises(ValueError, match="was made with"):
        task_split(tmp_path, task, 5000, 250, 1000, seed=2)
    with pytest.raises(ValueError, match="leaves none for training"):
        make_task_split(task, 10, 100, len(frame), frame=frame)
    with pytest.raises(ValueError, match="task must be one of"):
        make_task_split("news", 10, 10, 10, frame=frame)
