"""Experiments that check the TalkLoRA paper's claims (docs/method.md §5–§7) with talklora_min.

Infrastructure: :mod:`analysis.config` (TOML configs, profiles), :mod:`analysis.data` (the
two-domain text task), :mod:`analysis.models` (offline MiniLM / SmolLM2 loaders, cached-prefix
training path), :mod:`analysis.results` (results store, resumable sweeps),
:mod:`analysis.experiments` (experiment registry) and :mod:`analysis.cli` (``python -m analysis
perturb|train|twins|figures|claims``).

Evidence: :mod:`analysis.topics` (one module per topic: its claims, figures and notebook),
:mod:`analysis.evidence` (declarations, the backing-test gate), :mod:`analysis.stats` (scipy-based
statistics); :mod:`analysis.claims` and :mod:`analysis.figures` write the report and the figures.
"""
