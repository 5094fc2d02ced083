"""The validated sections of an experiment config (``[perturb]``, ``[train]``, ``[twins]``, ``[lm]``,
``[planted]``) with their constants; the field validators are in :mod:`analysis.fields`, the margins
and rules in the preregistration (:mod:`analysis.prereg`).  :mod:`analysis.config` assembles the
sections into an :class:`~analysis.config.ExperimentConfig` and reads profiles and files.  Every field is checked
in ``__post_init__`` and an invalid value raises :class:`ConfigError` naming ``section.field``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .methods import METHODS, reference, tagged

# Perturbation kinds (docs/method.md §4): isotropic Gaussian in x, Gaussian confined to one expert block of
# the code h, adversarial PGD in the eps-ball.  These are the strings passed to
# ``talklora_min.probes.perturbation_response(..., kind=...)``.
PERTURB_KINDS = ("gaussian", "block", "adversarial")
REAL_MODELS = ("minilm", "smollm")
TRAIN_METHODS = tuple(METHODS)               # every entry of the method registry (analysis.methods)
TRAIN_TASKS = ("sentiment", "topic")         # = analysis.data.TASKS
TWIN_MODELS = tagged("twin-arm")
# "same-rank": every method uses train.rank (and num_experts for the MoE methods); trainable-parameter
#   counts differ and are reported (F5 plots accuracy against them).
# "match-params": each method's rank is chosen (a multiple of num_experts for MoE methods) so that
#   its trainable-parameter count is the closest to that of the reference method at train.rank.
MATCHED_BUDGET_RULES = ("same-rank", "match-params")
MINILM_TARGETS = ("query", "key", "value", "up", "down")   # up = intermediate.dense, down = output.dense
TWIN_OPTIMIZERS = ("adamw", "sgd")
SCALE_CONTROLS = ("spectral", "frobenius")   # C5 control: W_r rescaled to ‖W_r(T⊗I)‖ in this norm


from .fields import (  # noqa: F401  (re-exported: the sections' validators and limits)
    ConfigError, MAX_SEED, MAX_STEPS, MAX_WIDTH, MAX_TOKEN_ELEMENTS, MAX_EXPERTS, MAX_SYNTHETIC_RANK,
    MAX_MC_DRAWS, MAX_PGD_STEPS, MAX_SENTENCES, MAX_BATCH, TASK_CLASS_SIZES, _fail, _is_int, _is_num, _int,
    _float, _int_list, _float_list, _seeds, _split_fits, _choice_list, _choice, _schedule, _expert_split,
    _talk_setting, _Section, MINILM_WIDTH, SMOLLM_WIDTH)


# ----------------------------------------------------------------------------- sections
@dataclass
class PerturbConfig(_Section):
    """Perturbation-amplification sweep (docs/method.md §4, claims C5 and C10, figures F2, F3, F9).

    Synthetic layers: one layer per (``grid`` entry ``[E, r]``, ``talk`` setting, seed), of size
    ``d_in -> d_out``, probed on ``n_tokens`` random tokens at every ``eps`` and ``kinds``.
    Real models: adapters injected into ``models`` (``minilm``, ``smollm``), probed on the hidden
    states of ``n_sentences`` real sentences tokenised to at most ``max_length`` tokens.
    ``controls``: the scale-matched MoELoRA-code controls of every talk setting (C5; ``spectral``:
    ‖W_r'‖₂ = ‖W_r(T⊗I)‖₂, ``frobenius``: the same in ‖·‖_F).  ``mc_draws`` independent draws of
    the official init per E in ``mc_experts`` (C8).
    """

    SECTION = "perturb"
    grid: list = field(default_factory=lambda: [[4, 32], [8, 32]])
    talk: list = field(default_factory=lambda: ["identity", "official", "uniform-mix:0.25",
                                                 "uniform-mix:0.5", "uniform-mix:0.75"])
    eps: list = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    kinds: list = field(default_factory=lambda: list(PERTURB_KINDS))
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    n_tokens: int = 256
    d_in: int = 384
    d_out: int = 384
    adversarial_steps: int = 10
    models: list = field(default_factory=lambda: ["minilm"])
    n_sentences: int = 32
    max_length: int = 64
    controls: list = field(default_factory=lambda: list(SCALE_CONTROLS))
    mc_draws: int = 20_000
    mc_experts: list = field(default_factory=lambda: [2, 4, 8, 16, 32])

    def __post_init__(self):
        p = self.SECTION
        if (not isinstance(self.grid, (list, tuple)) or not self.grid
                or not all(isinstance(g, (list, tuple)) and len(g) == 2 and all(_is_int(x) and x > 0 for x in g)
                           for g in self.grid)):
            _fail(f"{p}.grid", "a non-empty list of [E, r] pairs of positive ints", self.grid)
        self.grid = [list(g) for g in self.grid]
        for E, r in self.grid:
            if r % E:
                _fail(f"{p}.grid", f"[E, r] pairs with E dividing r ({[E, r]} does not)", self.grid)
            if E > MAX_EXPERTS or r > MAX_SYNTHETIC_RANK:
                _fail(f"{p}.grid", f"[E, r] pairs with E <= {MAX_EXPERTS} and r <= {MAX_SYNTHETIC_RANK} "
                      f"({[E, r]} is not)", self.grid)
        if len({tuple(g) for g in self.grid}) != len(self.grid):
            _fail(f"{p}.grid", "a list of distinct [E, r] pairs", self.grid)
        if not any(E >= 3 for E, _ in self.grid):        # the dense vs top-k router comparison needs one
            _fail(f"{p}.grid", "a list with at least one [E, r] pair with E >= 3 (with E = 2, top-2 routing "
                  "is the dense router: the router comparison needs a sparse one)", self.grid)
        if not isinstance(self.talk, (list, tuple)) or not self.talk or len(set(self.talk)) != len(self.talk):
            _fail(f"{p}.talk", "a non-empty list of distinct talk settings", self.talk)
        self.talk = [_talk_setting(f"{p}.talk", t) for t in self.talk]
        self.eps = _float_list(f"{p}.eps", self.eps, lo=0.0, lo_open=True)
        self.kinds = _choice_list(f"{p}.kinds", self.kinds, PERTURB_KINDS)
        self.seeds = _seeds(f"{p}.seeds", self.seeds)
        _int(f"{p}.d_in", self.d_in, lo=1, hi=MAX_WIDTH)
        _int(f"{p}.d_out", self.d_out, lo=1, hi=MAX_WIDTH)
        _int(f"{p}.n_tokens", self.n_tokens, lo=1, hi=MAX_TOKEN_ELEMENTS // max(self.d_in, self.d_out))
        _int(f"{p}.adversarial_steps", self.adversarial_steps, lo=1, hi=MAX_PGD_STEPS)
        if not isinstance(self.models, (list, tuple)) or len(set(self.models)) != len(self.models) \
                or any(m not in REAL_MODELS for m in self.models):
            _fail(f"{p}.models", f"a list (possibly empty) of distinct values from {list(REAL_MODELS)}",
                  self.models)
        self.models = list(self.models)
        _int(f"{p}.n_sentences", self.n_sentences, lo=1, hi=MAX_SENTENCES)
        _int(f"{p}.max_length", self.max_length, lo=2, hi=512)
        self.controls = _choice_list(f"{p}.controls", self.controls, SCALE_CONTROLS)
        _int(f"{p}.mc_draws", self.mc_draws, lo=1, hi=MAX_MC_DRAWS)
        self.mc_experts = _int_list(f"{p}.mc_experts", self.mc_experts, lo=1, hi=MAX_EXPERTS)


@dataclass
class TrainConfig(_Section):
    """Classification on real text with MiniLM (docs/method.md §7; claims C5–C7, C9, C11, C12; F1, F4, F5, F10, F11).

    ``tasks``: separate tasks (``sentiment``: Rotten Tomatoes fresh/rotten; ``topic``: BBC, 5 topics),
    each trained and scored on its own.  ``methods`` run on every task, ``extra_methods`` only on the
    first task (the one C6's balance comparisons are scored on).  Only the top ``adapt_top_layers`` BERT layers are adapted
    (``targets`` among query, key, value, up = intermediate.dense, down = output.dense) and run during
    training; the frozen prefix's hidden states are computed once per task (``cache_prefix``).
    Per task: exactly ``n_test`` test and ``n_val`` validation examples (stratified by class) and at
    most ``n_train`` training examples (all the rest when fewer remain).  ``n_probe`` validation
    examples are the fixed token set of the routing-churn checkpoints (every ``eval_every`` steps).
    ``alpha = nan``/absent is not allowed in TOML, so ``alpha = 0`` means ``s = 1`` (official).
    C7 budgets: ``budget_ranks`` (TalkLoRA-official ranks besides ``rank``; may be empty) on
    ``budget_tasks`` for ``budget_methods``, each other method at the rank matching TalkLoRA's count.
    """

    SECTION = "train"
    tasks: list = field(default_factory=lambda: list(TRAIN_TASKS))
    methods: list = field(default_factory=lambda: list(TRAIN_METHODS))
    extra_methods: list = field(default_factory=list)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 200
    eval_every: int = 50
    batch_size: int = 16
    lr: float = 3e-4
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    rank: int = 16
    num_experts: int = 4
    alpha: float = 0.0
    dropout: float = 0.05
    adapt_top_layers: int = 2
    targets: list = field(default_factory=lambda: list(MINILM_TARGETS))
    max_length: int = 64
    n_train: int = 2000
    n_val: int = 300
    n_test: int = 1000
    n_probe: int = 64
    split_seed: int = 0
    matched_budget: str = "same-rank"
    cache_prefix: bool = True
    budget_ranks: list = field(default_factory=list)
    budget_methods: list = field(default_factory=lambda: [reference(), *tagged("baseline")])
    budget_tasks: list = field(default_factory=lambda: ["sentiment"])
    tuning_seeds: list = field(default_factory=lambda: [100, 101])
    lr_grid: list = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    head_lr_grid: list = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    tie_threshold: float = 0.1

    def __post_init__(self):
        p = self.SECTION
        self.tasks = _choice_list(f"{p}.tasks", self.tasks, TRAIN_TASKS)
        self.methods = _choice_list(f"{p}.methods", self.methods, TRAIN_METHODS)
        if not isinstance(self.extra_methods, (list, tuple)) or any(m not in TRAIN_METHODS for m in self.extra_methods) \
                or len(set(self.extra_methods)) != len(self.extra_methods) or set(self.extra_methods) & set(self.methods):
            _fail(f"{p}.extra_methods", f"a list (possibly empty) of distinct values from {list(TRAIN_METHODS)} "
                  "not already in train.methods", self.extra_methods)
        self.extra_methods = list(self.extra_methods)
        self.seeds = _seeds(f"{p}.seeds", self.seeds)
        _schedule(p, self.steps, self.eval_every)
        _int(f"{p}.batch_size", self.batch_size, lo=1, hi=MAX_BATCH)
        self.lr = _float(f"{p}.lr", self.lr, lo=0.0, lo_open=True)
        self.head_lr = _float(f"{p}.head_lr", self.head_lr, lo=0.0, lo_open=True)
        self.weight_decay = _float(f"{p}.weight_decay", self.weight_decay, lo=0.0)
        _expert_split(p, self.rank, self.num_experts, MINILM_WIDTH)
        self.alpha = _float(f"{p}.alpha", self.alpha, lo=0.0)
        self.dropout = _float(f"{p}.dropout", self.dropout, lo=0.0, hi=0.99)
        _int(f"{p}.adapt_top_layers", self.adapt_top_layers, lo=1, hi=6)
        self.targets = _choice_list(f"{p}.targets", self.targets, MINILM_TARGETS)
        _int(f"{p}.max_length", self.max_length, lo=2, hi=512)
        _int(f"{p}.n_train", self.n_train, lo=2)
        _int(f"{p}.n_val", self.n_val, lo=2)
        _int(f"{p}.n_test", self.n_test, lo=2)
        _int(f"{p}.n_probe", self.n_probe, lo=1)
        if self.n_probe > self.n_val:
            _fail(f"{p}.n_probe", f"an int <= train.n_val ({self.n_val})", self.n_probe)
        _int(f"{p}.split_seed", self.split_seed, lo=0, hi=MAX_SEED)
        self.matched_budget = _choice(f"{p}.matched_budget", self.matched_budget, MATCHED_BUDGET_RULES)
        if not isinstance(self.cache_prefix, bool):
            _fail(f"{p}.cache_prefix", "a bool", self.cache_prefix)
        if not isinstance(self.budget_ranks, (list, tuple)) or not all(_is_int(r) and 0 < r <= MINILM_WIDTH
                                                                       for r in self.budget_ranks) \
                or len(set(self.budget_ranks)) != len(self.budget_ranks) \
                or any(r % self.num_experts or r == self.rank for r in self.budget_ranks):
            _fail(f"{p}.budget_ranks", f"a list (possibly empty) of distinct multiples of train.num_experts "
                  f"({self.num_experts}) up to {MINILM_WIDTH}, other than train.rank ({self.rank})", self.budget_ranks)
        self.budget_ranks = list(self.budget_ranks)
        self.budget_methods = _choice_list(f"{p}.budget_methods", self.budget_methods,
                                           [m for m in TRAIN_METHODS if METHODS[m].adapter is not None])
        if reference() not in self.budget_methods:
            _fail(f"{p}.budget_methods", f"a list that contains {reference()!r} (the budget reference)",
                  self.budget_methods)
        self.budget_tasks = _choice_list(f"{p}.budget_tasks", self.budget_tasks, TRAIN_TASKS)
        _split_fits(f"{p}.n_test", dict.fromkeys([*self.tasks, *self.budget_tasks]), self.n_val, self.n_test)
        self.tuning_seeds = _seeds(f"{p}.tuning_seeds", self.tuning_seeds)
        if set(self.seeds) & set(self.tuning_seeds):
            _fail(f"{p}.tuning_seeds", f"a list disjoint from train.seeds {self.seeds}", self.tuning_seeds)
        self.lr_grid = _float_list(f"{p}.lr_grid", self.lr_grid, lo=0.0, lo_open=True)
        self.head_lr_grid = _float_list(f"{p}.head_lr_grid", self.head_lr_grid, lo=0.0, lo_open=True)
        self.tie_threshold = _float(f"{p}.tie_threshold", self.tie_threshold, lo=0.0, hi=1.0)

    @property
    def scaling_alpha(self) -> float | None:
        """The adapters' ``alpha`` argument: ``None`` (s = 1) when ``alpha == 0``."""
        return None if self.alpha == 0 else self.alpha


@dataclass
class TwinsConfig(_Section):
    """Function-matched twin runs (C9, F8): TalkLoRA and the MoELoRA-code twin obtained by talk
    absorption start from the same function and are trained on the same batches, per ``tasks`` ×
    ``optimizers`` × ``seeds`` (the splits, probe set and model settings are those of ``[train]``).
    ``models`` (registry entries tagged ``twin-arm``) must contain the reference method (the arm the others are compared to).  AdamW trains the
    head at ``train.head_lr``, SGD at ``head_lr_sgd`` (adapters: ``lr_adamw`` / ``lr_sgd``)."""

    SECTION = "twins"
    tasks: list = field(default_factory=lambda: ["sentiment"])
    models: list = field(default_factory=lambda: [reference(), *tagged("function-matched")])
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    steps: int = 200
    eval_every: int = 25
    optimizers: list = field(default_factory=lambda: list(TWIN_OPTIMIZERS))
    lr_adamw: float = 3e-4
    lr_sgd: float = 1e-2
    head_lr_sgd: float = 0.1
    weight_decay: float = 0.01
    talk_init: str = "official"

    def __post_init__(self):
        p = self.SECTION
        self.tasks = _choice_list(f"{p}.tasks", self.tasks, TRAIN_TASKS)
        self.models = _choice_list(f"{p}.models", self.models, TWIN_MODELS)
        if reference() not in self.models:
            _fail(f"{p}.models", f"a list that contains {reference()!r} (the reference)", self.models)
        self.seeds = _seeds(f"{p}.seeds", self.seeds)
        _schedule(p, self.steps, self.eval_every)
        self.optimizers = _choice_list(f"{p}.optimizers", self.optimizers, TWIN_OPTIMIZERS)
        self.lr_adamw = _float(f"{p}.lr_adamw", self.lr_adamw, lo=0.0, lo_open=True)
        self.lr_sgd = _float(f"{p}.lr_sgd", self.lr_sgd, lo=0.0, lo_open=True)
        self.head_lr_sgd = _float(f"{p}.head_lr_sgd", self.head_lr_sgd, lo=0.0, lo_open=True)
        self.weight_decay = _float(f"{p}.weight_decay", self.weight_decay, lo=0.0)
        if self.talk_init != "official":
            _fail(f"{p}.talk_init", "'official' (the twins start from the seed's official T)", self.talk_init)


LM_METHODS = tuple(n for n, m in METHODS.items() if m.adapter is not None)   # the frozen base is always scored
LM_MAX_TEXTS = 1319          # per domain: GSM8K's test split, the smallest of the three domains
SMOLLM_LAYERS = 30


@dataclass
class LMConfig(_Section):
    """Causal-LM training of SmolLM2-135M on a three-domain mix (movie reviews, BBC news, GSM8K;
    docs/method.md §7) with the official TalkLoRA layout (q/k/v/up/down, ``rank`` 32, ``num_experts`` 4,
    B tied, s = 1, ``dropout`` 0.05, AdamW ``lr`` 3e-4) on the top ``adapt_top_layers`` layers,
    the frozen prefix cached (claims C6, C11, C12; ``analysis/lm.py``).

    ``n_train`` / ``n_test`` texts per domain (drawn with ``split_seed``), truncated to
    ``max_length`` tokens.  Checkpoints every ``eval_every`` steps (routing load, specialisation,
    churn on all held-out tokens); the held-out loss at step 0 and the last step, or at every
    checkpoint with ``loss_every_eval``.
    """

    SECTION = "lm"
    methods: list = field(default_factory=lambda: [*tagged("baseline"), *tagged("scale-matched"),
                                                   *tagged("function-matched"), reference()])
    seeds: list = field(default_factory=lambda: list(range(8)))
    steps: int = 200
    eval_every: int = 50
    batch_size: int = 8
    max_length: int = 64
    adapt_top_layers: int = 4
    n_train: int = 400
    n_val: int = 30
    n_test: int = 50
    split_seed: int = 0
    lr: float = 3e-4
    weight_decay: float = 0.01
    rank: int = 32
    num_experts: int = 4
    dropout: float = 0.05
    loss_every_eval: bool = False
    tuning_seeds: list = field(default_factory=lambda: [100])
    lr_grid: list = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    tie_threshold: float = 0.1

    def __post_init__(self):
        p = self.SECTION
        self.methods = _choice_list(f"{p}.methods", self.methods, LM_METHODS)
        self.seeds = _seeds(f"{p}.seeds", self.seeds)
        _schedule(p, self.steps, self.eval_every)
        _int(f"{p}.batch_size", self.batch_size, lo=1, hi=MAX_BATCH)
        _int(f"{p}.max_length", self.max_length, lo=2, hi=2048)
        _int(f"{p}.adapt_top_layers", self.adapt_top_layers, lo=1, hi=SMOLLM_LAYERS)
        _int(f"{p}.n_train", self.n_train, lo=1)
        _int(f"{p}.n_val", self.n_val, lo=1)
        _int(f"{p}.n_test", self.n_test, lo=1)
        if self.n_train + self.n_val + self.n_test > LM_MAX_TEXTS:
            _fail(f"{p}.n_test", f"an int with lm.n_train + lm.n_val + lm.n_test <= {LM_MAX_TEXTS} (GSM8K has "
                  f"{LM_MAX_TEXTS} problems; n_train = {self.n_train}, n_val = {self.n_val})", self.n_test)
        _int(f"{p}.split_seed", self.split_seed, lo=0, hi=MAX_SEED)
        self.lr = _float(f"{p}.lr", self.lr, lo=0.0, lo_open=True)
        self.weight_decay = _float(f"{p}.weight_decay", self.weight_decay, lo=0.0)
        _expert_split(p, self.rank, self.num_experts, SMOLLM_WIDTH)
        self.dropout = _float(f"{p}.dropout", self.dropout, lo=0.0, hi=0.99)
        if not isinstance(self.loss_every_eval, bool):
            _fail(f"{p}.loss_every_eval", "a bool", self.loss_every_eval)
        self.tuning_seeds = _seeds(f"{p}.tuning_seeds", self.tuning_seeds)
        if set(self.seeds) & set(self.tuning_seeds):
            _fail(f"{p}.tuning_seeds", f"a list disjoint from lm.seeds {self.seeds}", self.tuning_seeds)
        self.lr_grid = _float_list(f"{p}.lr_grid", self.lr_grid, lo=0.0, lo_open=True)
        self.tie_threshold = _float(f"{p}.tie_threshold", self.tie_threshold, lo=0.0, hi=1.0)


@dataclass
class PlantedConfig(_Section):
    """The planted-teacher setting (docs/method.md §7; ``analysis/planted.py``): a frozen random
    ``d_in -> d_out`` map, inputs from ``clusters`` Gaussian clusters (means at ``separation``, noise
    ``noise``), a teacher update of rank ``teacher_rank`` and size ``scale`` per cluster.  Students:
    ``methods`` with ``num_experts`` experts and total ``rank``; each method's lr is chosen from
    ``lr_grid`` on the validation split with ``tuning_seeds`` (disjoint from ``seeds``), then every
    method trains ``steps`` steps per evaluation seed (cosine decay).  ``tie_threshold``: the top-2
    gate gap below which a point's top-1 expert counts as a tie (no churn)."""

    SECTION = "planted"
    methods: list = field(default_factory=lambda: [*tagged("no-adapter"), *tagged("baseline"), reference(),
                                                   *tagged("function-matched"), *tagged("scale-matched")])
    seeds: list = field(default_factory=lambda: list(range(8)))
    tuning_seeds: list = field(default_factory=lambda: [100, 101])
    lr_grid: list = field(default_factory=lambda: [3e-3, 1e-2, 3e-2])
    steps: int = 800
    eval_every: int = 100
    batch_size: int = 64
    weight_decay: float = 0.0
    d_in: int = 32
    d_out: int = 32
    clusters: int = 4
    num_experts: int = 4
    rank: int = 16
    teacher_rank: int = 4
    separation: float = 4.0
    noise: float = 1.0
    scale: float = 1.0
    n_train: int = 2048
    n_val: int = 512
    n_test: int = 1024
    n_probe: int = 256
    data_seed: int = 0
    tie_threshold: float = 0.1
    amplification_tokens: int = 128
    amplification_eps: list = field(default_factory=lambda: [0.1])
    adversarial_steps: int = 5
    budget_ranks: list = field(default_factory=lambda: [16, 24, 32])   # every baseline within ±2 % at each
    budget_methods: list = field(default_factory=lambda: [reference(), *tagged("baseline")])

    def __post_init__(self):
        p = self.SECTION
        self.methods = _choice_list(f"{p}.methods", self.methods, TRAIN_METHODS)
        self.seeds = _seeds(f"{p}.seeds", self.seeds)
        self.tuning_seeds = _seeds(f"{p}.tuning_seeds", self.tuning_seeds)
        if set(self.seeds) & set(self.tuning_seeds):
            _fail(f"{p}.tuning_seeds", f"a list disjoint from planted.seeds {self.seeds}", self.tuning_seeds)
        self.lr_grid = _float_list(f"{p}.lr_grid", self.lr_grid, lo=0.0, lo_open=True)
        _schedule(p, self.steps, self.eval_every)
        _int(f"{p}.batch_size", self.batch_size, lo=1)
        self.weight_decay = _float(f"{p}.weight_decay", self.weight_decay, lo=0.0)
        for name in ("d_in", "d_out", "clusters", "teacher_rank", "n_probe", "amplification_tokens"):
            _int(f"{p}.{name}", getattr(self, name), lo=1, hi=100_000)
        _expert_split(p, self.rank, self.num_experts, max(self.d_in, self.d_out))
        if self.clusters < 2:
            _fail(f"{p}.clusters", "an int >= 2 (one cluster needs no routing)", self.clusters)
        for name in ("n_train", "n_val", "n_test"):
            _int(f"{p}.{name}", getattr(self, name), lo=2, hi=10_000_000)
        if self.n_probe > self.n_val or self.amplification_tokens > self.n_test:
            _fail(f"{p}.n_probe", f"at most planted.n_val ({self.n_val}) (and amplification_tokens at most "
                  f"planted.n_test)", self.n_probe)
        self.separation = _float(f"{p}.separation", self.separation, lo=0.0)
        self.noise = _float(f"{p}.noise", self.noise, lo=0.0, lo_open=True)
        self.scale = _float(f"{p}.scale", self.scale, lo=0.0, lo_open=True)
        _int(f"{p}.data_seed", self.data_seed, lo=0, hi=MAX_SEED)
        self.tie_threshold = _float(f"{p}.tie_threshold", self.tie_threshold, lo=0.0, hi=1.0)
        self.amplification_eps = _float_list(f"{p}.amplification_eps", self.amplification_eps, lo=0.0, lo_open=True)
        _int(f"{p}.adversarial_steps", self.adversarial_steps, lo=0, hi=1000)
        if not isinstance(self.budget_ranks, (list, tuple)) or not all(_is_int(r) and 0 < r <= 4096 for r in self.budget_ranks) \
                or len(set(self.budget_ranks)) != len(self.budget_ranks) \
                or any(r % self.num_experts for r in self.budget_ranks):
            _fail(f"{p}.budget_ranks", f"a list (possibly empty) of distinct multiples of planted.num_experts "
                  f"({self.num_experts})", self.budget_ranks)
        self.budget_ranks = list(self.budget_ranks)
        self.budget_methods = _choice_list(f"{p}.budget_methods", self.budget_methods,
                                           [m for m in self.methods if METHODS[m].adapter is not None])
        if reference() not in self.budget_methods:
            _fail(f"{p}.budget_methods", f"a list that contains {reference()!r} (the budget reference)",
                  self.budget_methods)


SECTIONS = {"perturb": PerturbConfig, "train": TrainConfig, "twins": TwinsConfig, "lm": LMConfig,
            "planted": PlantedConfig}
