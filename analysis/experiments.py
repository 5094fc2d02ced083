"""The one experiment registry shared by figures and claims (importing it loads no torch).

:data:`EXPERIMENTS` maps every saved experiment (a ``<results_dir>/<name>/rows.csv``) to the
``python -m analysis <command>`` that produces it; :func:`ensure_results` runs those commands
(finished cells are skipped), :func:`load` / :func:`load_all` read them and raise the one
:class:`MissingResultsError`, whose message names the command with the same ``--results-dir``.
"""
from __future__ import annotations

from pathlib import Path

# experiment -> the command (``analysis.<command>.run``) that produces it
EXPERIMENTS = {
    "perturb_synthetic": "perturb", "perturb_routers": "perturb", "talk_norms": "perturb",
    "equivalence": "perturb", "perturb_real": "perturb", "perturb_controls": "perturb",
    "train": "train", "train_tuning": "train", "train_budget": "train",      # tuning sweep and C7 budgets too
    "twins": "twins", "lm": "lm", "lm_tuning": "lm",
    "planted": "planted", "planted_tuning": "planted", "planted_budget": "planted",
    "custom": "train",                    # a user [setting]: `python -m analysis train --config my.toml`
    "custom_tuning": "train",             # its lr selection
}
COMMANDS = tuple(dict.fromkeys(EXPERIMENTS.values()))      # perturb, train, twins, lm, planted (in this order)


def command_for(experiment: str, results_dir="results") -> str:
    """``python -m analysis <command> --results-dir <results_dir>`` for ``experiment``."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {sorted(EXPERIMENTS)}, got {experiment!r}")
    return f"python -m analysis {EXPERIMENTS[experiment]} --results-dir {results_dir}"


class MissingResultsError(FileNotFoundError):
    """An experiment has no ``rows.csv``; the message names the command that produces it."""

    def __init__(self, experiment: str, results_dir="results", needed_by: str = "claims"):
        self.experiment, self.results_dir = experiment, results_dir
        cmd = command_for(experiment, results_dir) if experiment in EXPERIMENTS else f"python -m analysis {experiment}"
        super().__init__(f"{needed_by} need the '{experiment}' results, but "
                         f"{Path(results_dir) / experiment / 'rows.csv'} does not exist: produce it with "
                         f"`{cmd}` (or run `python -m analysis {needed_by} --results-dir {results_dir}`, "
                         f"which runs the missing experiments first)")


def ensure_results(config, *, results_dir="results", workers: int = 1, executor=None, force: bool = False):
    """Run every experiment command (``analysis.<command>.run``) with the same arguments; finished cells
    are skipped, so this only fills in what is missing (or everything with ``force``).  A config with a
    user ``[setting]`` trains it (``analysis.custom``) in place of the MiniLM tasks, as the command line does."""
    import importlib

    for command in COMMANDS:
        if command == "train" and getattr(config, "setting", None) is not None:
            command = "custom"
        module = importlib.import_module(f"{__package__ or 'analysis'}.{command}")
        module.run(config, results_dir=results_dir, workers=workers, executor=executor, force=force)


def load(experiment: str, results_dir="results", needed_by: str = "claims"):
    """``rows.csv`` of ``experiment`` as a data frame, or :class:`MissingResultsError`."""
    from .results import ResultStore          # here, not above: the results store loads torch

    store = ResultStore(experiment, results_dir)
    if not store.rows_path.is_file():
        raise MissingResultsError(experiment, results_dir, needed_by)
    return store.read_rows()


def load_all(experiments, results_dir="results", needed_by: str = "claims", optional=()) -> tuple[dict, dict]:
    """Rows and meta (``{}`` when unreadable) of every experiment; fails before reading if one is missing.
    ``optional`` experiments are read when they exist and left out otherwise (a setting that did not run)."""
    from .results import ResultStore

    experiments = list(dict.fromkeys(experiments))
    for name in experiments:
        if name not in optional and not ResultStore(name, results_dir).rows_path.is_file():
            raise MissingResultsError(name, results_dir, needed_by)
    data, meta = {}, {}
    for name in experiments:
        if not ResultStore(name, results_dir).rows_path.is_file():
            continue
        store = ResultStore(name, results_dir)
        data[name] = store.read_rows()
        try:
            meta[name] = store.read_meta()
        except (OSError, ValueError):
            meta[name] = {}
    return data, meta
