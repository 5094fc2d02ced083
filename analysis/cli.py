"""Command line: ``python -m analysis perturb|train|twins|figures|claims|config [options]``.

Each subcommand loads and validates the config first (an invalid config fails before any work),
checks the results directory and the device, then imports ``analysis.<name>`` lazily and calls ::

    analysis.<name>.run(config, *, results_dir=Path, workers=int, executor=..., force=bool[, device=str])

where ``config`` is the whole :class:`analysis.config.ExperimentConfig` (each experiment reads its
own section) and ``device`` goes only to the commands in :data:`TAKES_DEVICE`.
``python -m analysis config [--profile/--config]`` prints the resolved config as TOML.

Options: ``--profile quick|paper`` (default quick), ``--config FILE.toml`` (complete, or
``extends = "<profile>"``; given together with ``--profile`` it is applied on top of that profile),
``--workers N`` (parallel cells on this machine; 1 = inline), ``--results-dir DIR`` (default
``results``), ``--force`` (re-run cells that are already done), ``--device cpu|cuda|mps|auto``
(experiments only; default cpu; ``auto`` = cuda if available, else mps, else cpu), ``--executor
local|slurm`` (default local; ``slurm`` submits one submitit job per cell, with ``--partition``,
``--time`` minutes, ``--gpus-per-node``, ``--cpus-per-task`` and ``--slurm-folder``, default
``<results-dir>/slurm_logs``).

Exit status (config, usage, device and file-system problems are one line on stderr, no traceback):

    0  success
    1  some cells failed (the finished ones are saved; re-run to resume), or an unexpected error
       (a bug: Python's traceback)
    2  usage, config, device, data-pack or file-system error (option and config errors stop before
       any work; a file-system error during a run keeps the cells finished so far)
    3  the results directory is locked by another run of the same experiment
    130  interrupted (Ctrl-C); the finished cells are saved
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
from pathlib import Path

from .config import ConfigError, available_profiles, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

EXPERIMENTS = {
    "perturb": "perturbation sweep, equivalence maps and official-init Monte Carlo on synthetic and real-model "
               "layers (C1-C5, C8, C10; F2, F3, F6, F7, F9)",
    "train": "two-domain MiniLM training of LoRA / MoELoRA / TalkLoRA (C4-C7; F1, F3, F4, F5)",
    "twins": "function-matched TalkLoRA / MoELoRA-code twin runs, AdamW and SGD (C9; F8)",
    "lm": "causal-LM training of SmolLM2-135M (official layout) on movie reviews / BBC news / GSM8K: "
          "LoRA, MoELoRA-code, scale-matched control, TalkLoRA (C6, C11, C12)",
    "planted": "the planted-teacher setting: every method regresses a cluster-routed low-rank teacher, lr tuned "
               "on validation, then paired evaluation seeds and matched budgets (C5-C7, C9, C11-C13; F12)",
    "figures": "draw every figure the claims cite (analysis/claims/) from saved results into figures/",
    "claims": "judge every claim (analysis/claims/) and write CLAIMS.md / claims.csv",
}
# The commands whose run() takes device=...; the others get no --device option (rather than one
# that would be silently ignored).
TAKES_DEVICE = frozenset({"perturb", "train", "twins", "lm", "planted"})
# The commands that write the report, and where --out-dir puts it (e.g. reports/paper for the paper profile).
WRITES_REPORT = {"figures": "where the figures go (default: figures/, which also updates the README gallery)",
                 "claims": "where CLAIMS.md and claims.csv go (default: the repository root, which also "
                           "updates the README's verdict table)"}
DEVICES = ("cpu", "cuda", "mps", "auto")
EXECUTORS = ("local", "slurm")
SLURM_OPTIONS = ("partition", "time", "gpus_per_node", "cpus_per_task", "slurm_folder")


class UsageError(ValueError):
    """A bad option combination or an unavailable device / executor (exit status 2)."""


def _int_at_least(lo: int):
    """argparse type: an int >= ``lo``, with a message naming the bound."""
    what = "a positive int" if lo == 1 else f"an int >= {lo}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value
    return parse


_positive_int, _nonnegative_int = _int_at_least(1), _int_at_least(0)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr (exit status 2) that names the option and
    what it accepts, instead of the usage block plus the error."""

    def error(self, message: str):
        option = message.split(":", 1)[0].removeprefix("argument ") if message.startswith("argument ") else None
        action = next((a for a in self._actions if option and option in a.option_strings), None)
        if action is not None and "choose from" not in message and "must be" not in message:
            accepted = (f"one of {list(action.choices)}" if action.choices else
                        action.metavar or action.dest.upper())
            message += f" ({action.option_strings[-1]} takes {accepted})"
        elif message.startswith("unrecognized arguments"):
            options = sorted({o for a in self._actions for o in a.option_strings if o.startswith("--")})
            message += f"; {self.prog} accepts {', '.join(options)}"
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")

    def parse_known_args(self, args=None, namespace=None):
        """Unknown options are reported by the subcommand's parser (naming what it accepts), not
        by the top-level one."""
        namespace, extras = super().parse_known_args(args, namespace)
        command = getattr(namespace, "command", None)
        if extras and self._subparsers is not None and command is not None:
            sub = next(a for a in self._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
            sub.choices[command].error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m analysis", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{perturb,train,twins,lm,planted,figures,claims,config}")
    for name, help_text in {**EXPERIMENTS, "config": "print the resolved config as TOML"}.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--profile", choices=available_profiles(), default=None,
                       help="named profile (default: quick, or only the --config file when that is given)")
        p.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                       help="TOML config file (extends = \"<profile>\", or complete on its own)")
        if name == "config":
            continue
        p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                       help="cells run in parallel (default 1: inline)")
        p.add_argument("--results-dir", type=Path, default=Path("results"), metavar="DIR",
                       help="results root (default: results)")
        p.add_argument("--force", action="store_true", help="re-run cells that are already done")
        if name in WRITES_REPORT:
            p.add_argument("--out-dir", type=Path, default=None, metavar="DIR", help=WRITES_REPORT[name])
        if name in TAKES_DEVICE:
            p.add_argument("--device", choices=DEVICES, default="cpu",
                           help="torch device (default cpu; auto = cuda, else mps, else cpu)")
        p.add_argument("--executor", choices=EXECUTORS, default="local",
                       help="local: inline / --workers processes; slurm: one submitit job per cell")
        g = p.add_argument_group("Slurm (--executor slurm)")
        g.add_argument("--partition", default=None, help="Slurm partition")
        g.add_argument("--time", type=_positive_int, default=None, metavar="MIN",
                       help="time limit per cell job in minutes (default 60)")
        g.add_argument("--gpus-per-node", type=_nonnegative_int, default=None, metavar="N",
                       help="GPUs per cell job (default 0; 1 with --device cuda/auto)")
        g.add_argument("--cpus-per-task", type=_positive_int, default=None, metavar="N",
                       help="CPU cores per cell job (default 4)")
        g.add_argument("--slurm-folder", type=Path, default=None, metavar="DIR",
                       help="submitit logs and pickles (default: <results-dir>/slurm_logs; must be on a "
                            "filesystem the compute nodes share)")
    return parser


def resolve_config(args):
    profile = args.profile if (args.profile is not None or args.config is not None) else "quick"
    return load_config(profile, args.config)


def resolve_device(name: str) -> str:
    """``cpu``/``cuda``/``mps`` if this machine has it, ``auto`` = the first of cuda, mps, cpu that
    is available; :class:`UsageError` for an unknown or unavailable device."""
    if name not in DEVICES:
        raise UsageError(f"--device must be one of {list(DEVICES)}, got {name!r}")
    import torch
    has = {"cpu": True, "cuda": torch.cuda.is_available(),
           "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if name == "auto":
        return next(d for d in ("cuda", "mps", "cpu") if has[d])
    if not has[name]:
        raise UsageError(f"--device {name}: not available on this machine (torch {torch.__version__} sees "
                         f"{[d for d in ('cuda', 'mps') if has[d]] or 'no GPU'}); use --device cpu or auto")
    return name


def make_executor(folder: str | Path, *, partition: str | None = None, time_min: int = 60, gpus_per_node: int = 0,
                  cpus_per_task: int = 4, cluster: str = "slurm"):
    """A ``submitit.AutoExecutor`` that runs each cell as its own job.  ``cluster="local"`` gives
    submitit's local executor (each cell in a subprocess of this machine) with the same settings;
    the Slurm-only ``partition`` is then ignored, as submitit does for another cluster's options."""
    try:
        import submitit
    except ImportError:
        raise UsageError("--executor slurm needs the submitit package (pip install submitit)") from None
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: Slurm's sbatch is not on PATH (run this on a Slurm login node)")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(timeout_min=time_min, gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task,
                  name="talklora-min")
    if partition is not None:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    return executor


def resolve_execution(args) -> str | None:
    """Check the device and executor options together; return the device the experiment gets.
    Local runs resolve it on this machine; Slurm runs from ``--gpus-per-node`` (the login node need
    not have the compute nodes' GPUs: ``auto`` and ``cuda`` mean the nodes' GPU)."""
    device = getattr(args, "device", None)
    if args.executor == "local":
        given = [f"--{o.replace('_', '-')}" for o in SLURM_OPTIONS if getattr(args, o) is not None]
        if given:
            raise UsageError(f"{', '.join(given)}: Slurm options, used only with --executor slurm")
        return resolve_device(device) if device is not None else None
    if args.workers != 1:
        raise UsageError("--workers applies to --executor local only (with slurm every cell is its own job)")
    if device in ("cuda", "auto"):
        if args.gpus_per_node is not None and args.gpus_per_node < 1:
            raise UsageError(f"--device {device} with --executor slurm needs --gpus-per-node >= 1")
        return "cuda"
    if device == "mps":
        raise UsageError("--device mps is not a Slurm device; use cuda, auto or cpu")
    return device


def build_executor(args, device: str | None):
    """None for ``--executor local`` (inline or ``--workers`` processes), else the Slurm executor."""
    if args.executor == "local":
        return None
    gpus = args.gpus_per_node if args.gpus_per_node is not None else (1 if device == "cuda" else 0)
    folder = args.slurm_folder if args.slurm_folder is not None else args.results_dir / "slurm_logs"
    return make_executor(folder, partition=args.partition, time_min=args.time or 60, gpus_per_node=gpus,
                         cpus_per_task=args.cpus_per_task or 4)


def check_writable_dir(path: Path, what: str = "results directory") -> None:
    """Create ``path`` (with parents) and check it is a writable directory; else ``OSError`` naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"{what} {path} exists and is not a directory") from None
    except OSError as err:
        raise OSError(f"{what} {path} cannot be created: {err.strerror or err}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path} is not writable")


def experiment_module(name: str):
    """``analysis.<name>``; raises ``NotImplementedError`` while that module does not exist yet."""
    module_name = f"{__package__ or 'analysis'}.{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise                                      # a missing dependency inside the module
        raise NotImplementedError(f"'{name}' is not implemented yet: {module_name} does not exist") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"config error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        print(config.to_toml(), end="")
        return EXIT_OK
    try:
        device = resolve_execution(args)
        check_writable_dir(args.results_dir)
        if getattr(args, "out_dir", None) is not None:
            check_writable_dir(args.out_dir, "--out-dir")
        executor = build_executor(args, device)
        # a user [setting] is trained by the same paired battery, in its own runner (analysis.custom)
        module = experiment_module("custom" if args.command == "train" and config.setting is not None else args.command)
        if not callable(getattr(module, "run", None)):
            raise UsageError(f"{module.__name__} has no run(config, ...) function")
    except (UsageError, NotImplementedError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return _run(module, config, args, executor, device)


def _run(module, config, args, executor, device) -> int:
    from .data import DataPackMissing
    from .results import DamagedResultsError, ResultsLockedError, SweepError
    kwargs = dict(results_dir=args.results_dir, workers=args.workers, executor=executor, force=args.force)
    if args.command in TAKES_DEVICE:
        kwargs["device"] = device
    out_dir = getattr(args, "out_dir", None)
    if out_dir is not None and args.command == "figures":
        kwargs["figures_dir"] = out_dir
    elif out_dir is not None:
        kwargs.update(out_md=out_dir / "CLAIMS.md", out_csv=out_dir / "claims.csv")
    try:
        module.run(config, **kwargs)
    except KeyboardInterrupt:
        print("interrupted: the finished cells are saved; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SweepError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except ResultsLockedError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_LOCKED
    except (ConfigError, DataPackMissing, DamagedResultsError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK
