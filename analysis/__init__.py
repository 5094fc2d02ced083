"""Experiments that check the TalkLoRA paper's claims (docs/method.md §5–§7) with talklora_min.

Registries (pure data, one entry per thing): :mod:`analysis.methods` (every adapter method: adapter,
router initialisation, tags, plot style), :mod:`analysis.settings` (where claims are judged: model,
layers, task, positive controls; user settings from a config file) and the preregistration
(:mod:`analysis.prereg`, ``analysis/preregistration.toml``: rules, controls, margin rules, deciding
comparisons, the profiles pinned by hash).

Experiments: :mod:`analysis.config` / :mod:`analysis.sections` (validated TOML configs and profiles),
:mod:`analysis.protocol` (lr tuning on validation, cosine schedule), :mod:`analysis.crn` (common
random numbers), the runners :mod:`analysis.planted`, :mod:`analysis.train` (MiniLM),
:mod:`analysis.lm` (SmolLM2), :mod:`analysis.twins`, :mod:`analysis.perturb`, :mod:`analysis.custom`
(a user setting), and :mod:`analysis.results` (resumable sweeps).  Command line: :mod:`analysis.cli`
(``python -m analysis perturb|train|twins|lm|planted|figures|claims``).

Evidence: :mod:`analysis.claims` (one module per claim: select → compare → verdict → render, and the
figures each claim cites), :mod:`analysis.stats` (scipy.stats; the one comparison-family type),
:mod:`analysis.report` and :mod:`analysis.figures` (CLAIMS.md / claims.csv and the figures).
"""
