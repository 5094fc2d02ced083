"""Command line: ``python -m analysis perturb|train|twins|figures|claims [options]``.

Each experiment subcommand loads and validates the config first (an invalid config fails before any
work), then imports ``analysis.<name>`` lazily and calls ::

    analysis.<name>.run(config, *, results_dir=Path, workers=int, force=bool)

where ``config`` is the whole :class:`analysis.config.ExperimentConfig` (each experiment reads its
own section).  ``python -m analysis config [--profile/--config]`` prints the resolved config as TOML.

Options: ``--profile quick|paper`` (default quick), ``--config FILE.toml`` (complete, or
``extends = "<profile>"``; given together with ``--profile`` it is applied on top of that profile),
``--workers N`` (parallel cells; 1 = inline), ``--results-dir DIR`` (default ``results``),
``--force`` (re-run cells that are already done).
Exit status: 0 success, 1 the experiment failed, 2 usage / config error / not implemented yet.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .config import ConfigError, available_profiles, load_config

EXPERIMENTS = {
    "perturb": "perturbation sweep, equivalence maps and official-init Monte Carlo on synthetic and real-model "
               "layers (C1-C5, C8, C10; F2, F3, F6, F7, F9)",
    "train": "two-domain MiniLM training of LoRA / MoELoRA / TalkLoRA (C4-C7; F1, F3, F4, F5)",
    "twins": "function-matched TalkLoRA / MoELoRA-code twin runs, AdamW and SGD (C9; F8)",
    "figures": "draw every figure of the evidence topics (analysis/topics/) from saved results into figures/",
    "claims": "judge every claim of the evidence topics (analysis/topics/) and write CLAIMS.md / claims.csv",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{perturb,train,twins,figures,claims,config}")
    for name, help_text in {**EXPERIMENTS, "config": "print the resolved config as TOML"}.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--profile", choices=available_profiles(), default=None,
                       help="named profile (default: quick, or only the --config file when that is given)")
        p.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                       help="TOML config file (may contain extends = \"<profile>\")")
        if name != "config":
            p.add_argument("--workers", type=int, default=1, help="cells run in parallel (default 1: inline)")
            p.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                           help="results root (default: results)")
            p.add_argument("--force", action="store_true", help="re-run cells that are already done")
    return parser


def resolve_config(args):
    profile = args.profile if (args.profile is not None or args.config is not None) else "quick"
    return load_config(profile, args.config)


def experiment_module(name: str):
    """``analysis.<name>``; raises ``NotImplementedError`` while that module does not exist yet."""
    module_name = f"{__package__ or 'analysis'}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise                                      # a missing dependency inside the module
        raise NotImplementedError(f"'{name}' is not implemented yet: {module_name} does not exist") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(config.to_toml(), end="")
        return 0
    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        module = experiment_module(args.command)
    except NotImplementedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not callable(getattr(module, "run", None)):
        print(f"error: {module.__name__} has no run(config, ...) function", file=sys.stderr)
        return 2
    from .results import SweepError
    try:
        module.run(config, results_dir=args.results_dir, workers=args.workers, force=args.force)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
