"""Experiments that check the TalkLoRA paper's claims (SPEC §5–§7) with talklora_min.

Infrastructure: :mod:`analysis.config` (TOML configs, profiles), :mod:`analysis.data` (the
two-domain text task), :mod:`analysis.models` (offline MiniLM / SmolLM2 loaders, cached-prefix
training path), :mod:`analysis.results` (results store, resumable sweeps) and
:mod:`analysis.cli` (``python -m analysis perturb|train|figures|claims``).
"""
