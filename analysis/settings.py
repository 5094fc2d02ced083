"""The setting registry: where the empirical claims are judged (docs/method.md §5, §7).

A setting is one :class:`Setting` entry: the model it adapts, which layers, the task and its data,
the experiment (``runner``) that trains it, the training objective, and the positive controls it
must pass before any of its comparisons counts as evidence.  Claims and reports name a setting
through its ``title`` (with the profile's steps), never through a free-form string; adding a task
or a model is one entry here plus, for a new kind of model, one loader.

A user setting comes from the ``[setting]`` table of a config file (:class:`UserSetting`): a local
Hugging Face model folder and a CSV / JSONL file of ``(text, label)`` rows (classification) or
plain ``text`` rows (causal LM); ``python -m analysis train --config my.toml`` runs the same paired
battery on it (:mod:`analysis.custom`).

Pure data (no torch): the claims layer imports it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

RUNNERS = ("train", "lm", "planted", "custom")
OBJECTIVES = ("classification", "causal-lm", "regression")
# Positive controls (docs/method.md §5): P1 adaptation matters, P2 routing is used, P3 the
# function-matched twins diverge (C9 only), P4 every deciding comparison has enough power.
CONTROLS = {"P1": "adaptation matters: the best adapter beats the no-adapter baseline by the declared gain",
            "P2": "routing is used: mean per-token gate entropy / log E at the end at most the declared fraction",
            "P3": "the function-matched twins measurably diverge (held-out logits)",
            "P4": "power: minimum detectable effect of every deciding comparison at most its margin"}


@dataclass(frozen=True)
class Setting:
    """One setting.  ``runner``: the experiment that trains it (``python -m analysis <runner>``);
    ``task``: that runner's task key; ``model``: the loader key (or a local folder for a user
    setting); ``layers``: which layers carry adapters, in words; ``controls``: the positive controls
    it declares (keys of :data:`CONTROLS`)."""

    name: str
    runner: str
    task: str
    model: str
    objective: str
    title: str
    layers: str
    controls: tuple[str, ...] = ("P1", "P2", "P4")
    description: str = ""

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise ValueError(f"setting {self.name!r}: runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"setting {self.name!r}: objective must be one of {OBJECTIVES}, got {self.objective!r}")
        unknown = sorted(set(self.controls) - set(CONTROLS))
        if unknown:
            raise ValueError(f"setting {self.name!r}: unknown control(s) {unknown}; accepted: {sorted(CONTROLS)}")

    def wording(self, steps: int | None = None) -> str:
        """How a verdict names the setting, e.g. ``MiniLM-L6 top layer, 200 steps, BBC topics``."""
        return f"{self.title.split(', ')[0]}, {self.layers}" + (f", {steps} steps" if steps else "") + \
            "".join(f", {part}" for part in self.title.split(", ")[1:])


SETTINGS: Mapping[str, Setting] = MappingProxyType({s.name: s for s in (
    Setting("minilm-sentiment", "train", "sentiment", "minilm", "classification",
            "MiniLM-L6, Rotten Tomatoes sentiment", "top layer(s), q/k/v/up/down",
            description="all-MiniLM-L6-v2 (frozen), adapters on the top BERT layer(s), a linear head on "
                        "mean-pooled tokens; fresh / rotten review snippets"),
    Setting("minilm-topic", "train", "topic", "minilm", "classification",
            "MiniLM-L6, BBC topics", "top layer(s), q/k/v/up/down",
            description="all-MiniLM-L6-v2 (frozen), adapters on the top BERT layer(s); 5 BBC news topics "
                        "(headline + first paragraph)"),
    Setting("smollm2-lm", "lm", "three-domain", "smollm2", "causal-lm",
            "SmolLM2-135M, movie / news / math causal LM", "top layers, official layout",
            description="SmolLM2-135M-Instruct (frozen), official TalkLoRA layout on the top decoder layers; "
                        "causal-LM loss on movie reviews, BBC news and GSM8K"),
    Setting("planted-teacher", "planted", "planted", "planted", "regression",
            "planted teacher, clustered inputs", "one linear layer",
            controls=("P1", "P2", "P4"),
            description="a frozen random linear map; inputs from K Gaussian clusters; the teacher adds a "
                        "cluster-chosen low-rank update; students regress the teacher (routing provably matters)"),
)})
TASK_SETTINGS = {(s.runner, s.task): s.name for s in SETTINGS.values()}


def setting(name: str) -> Setting:
    """The registry entry ``name``; ``ValueError`` listing the accepted names."""
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {list(SETTINGS)}, got {name!r}")
    return SETTINGS[name]


def for_task(runner: str, task: str) -> Setting:
    """The built-in setting that ``runner`` trains under its task key ``task``."""
    if (runner, task) not in TASK_SETTINGS:
        raise ValueError(f"no setting for runner {runner!r} and task {task!r}; registered: "
                         f"{sorted(TASK_SETTINGS)}")
    return SETTINGS[TASK_SETTINGS[(runner, task)]]


# ----------------------------------------------------------------------------- user settings
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
USER_OBJECTIVES = ("auto", "classification", "causal-lm")
DATA_SUFFIXES = (".csv", ".jsonl")


@dataclass
class UserSetting:
    """The ``[setting]`` table of a config file: a setting of the user's own.

    ``model``: a local Hugging Face model folder (``config.json`` + weights + tokenizer files);
    ``data``: a ``.csv`` or ``.jsonl`` file with a ``text_column`` and, for classification, a
    ``label_column`` (any values; at least two classes).  ``objective = "auto"`` picks
    classification when the label column exists, else causal LM.  Relative paths are resolved
    against the config file's folder.  ``adapt_top_layers`` top blocks of the model carry adapters
    on ``targets`` (suffixes of module names; empty = the architecture's usual projections).
    ``n_val`` / ``n_test`` examples are held out (stratified by label for classification); the
    methods, seeds, steps and optimiser come from ``[train]`` (classification) or ``[lm]`` (causal LM).
    """

    SECTION = "setting"
    name: str = ""
    model: str = ""
    data: str = ""
    objective: str = "auto"
    text_column: str = "text"
    label_column: str = "label"
    adapt_top_layers: int = 1
    targets: list = None
    max_length: int = 64
    n_val: int = 100
    n_test: int = 200
    split_seed: int = 0

    def __post_init__(self):
        from .sections import ConfigError, _choice, _int

        p = self.SECTION
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name) or self.name in SETTINGS:
            raise ConfigError(f"{p}.name: must be a new name of lower-case letters, digits, '-' or '_' "
                              f"(not a built-in setting {list(SETTINGS)}), got {self.name!r}")
        for key in ("model", "data", "text_column", "label_column"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key):
                raise ConfigError(f"{p}.{key}: must be a non-empty string, got {getattr(self, key)!r}")
        if Path(self.data).suffix.lower() not in DATA_SUFFIXES:
            raise ConfigError(f"{p}.data: must be a {' or '.join(DATA_SUFFIXES)} file, got {self.data!r}")
        _choice(f"{p}.objective", self.objective, USER_OBJECTIVES)
        self.targets = [] if self.targets is None else self.targets
        if not isinstance(self.targets, list) or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"{p}.targets: must be a list of module-name suffixes (empty = the "
                              f"architecture's usual projections), got {self.targets!r}")
        _int(f"{p}.adapt_top_layers", self.adapt_top_layers, lo=1, hi=1024)
        _int(f"{p}.max_length", self.max_length, lo=2, hi=8192)
        _int(f"{p}.n_val", self.n_val, lo=2, hi=10**6)
        _int(f"{p}.n_test", self.n_test, lo=2, hi=10**6)
        _int(f"{p}.split_seed", self.split_seed, lo=0, hi=2**31 - 1)

    def to_dict(self) -> dict:
        from dataclasses import asdict
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UserSetting":
        from dataclasses import fields

        from .sections import ConfigError
        if not isinstance(data, dict):
            raise ConfigError(f"[setting]: must be a table, got {data!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"setting.{unknown[0]}: unknown key (unknown: {unknown}); accepted keys: {names}")
        return cls(**data)

    def resolved(self, base: Path) -> "UserSetting":
        """A copy whose relative ``model`` / ``data`` paths are resolved against ``base``."""
        from dataclasses import replace
        fix = {k: str((base / getattr(self, k)).resolve()) for k in ("model", "data")
               if not Path(getattr(self, k)).is_absolute()}
        return replace(self, **fix) if fix else self

    def as_setting(self, objective: str) -> Setting:
        """The registry-style entry of this user setting (``objective`` resolved from the data)."""
        return Setting(self.name, "custom", self.name, self.model, objective,
                       f"{Path(self.model).name}, {Path(self.data).name}",
                       f"top {self.adapt_top_layers} block(s)",
                       description=f"user setting: model {self.model}, data {self.data}")
