"""Experiment configuration: TOML files, named profiles, validated dataclasses.

A config has one section per experiment — ``[perturb]`` (docs/method.md §4 perturbation sweeps, C1–C5,
C8, C10), ``[train]`` (MiniLM sentiment / topic), ``[twins]`` (function-matched twin runs, F8),
``[lm]`` (SmolLM2 causal LM), ``[planted]`` (the planted-teacher setting) — and optionally a user
``[setting]`` (:class:`analysis.settings.UserSetting`).  Margins, controls and rules are not part of
a config: they are preregistered (``analysis/preregistration.toml``).  The section dataclasses live
in :mod:`analysis.sections` and are re-exported here.
Every field is validated in ``__post_init__``; an invalid value raises :class:`ConfigError`
*before any work starts*, with a message that names the field::

    train.seeds: must be a non-empty list of ints, got []

Unknown keys (in any section, or unknown sections) are errors too.

Profiles live in ``analysis/profiles/<name>.toml`` (``quick``: everything the figures need in
≤ 10 min on a 2-core CPU; ``paper``: the full study).  A user file can start from a profile and
override only some fields::

    extends = "quick"          # optional; without it the file must be complete
    [train]
    seeds = [0, 1, 2, 3, 4]

A file without ``extends`` must give every section and every field (an empty file is refused, and
so is a partial one, naming the missing fields): nothing silently comes from the dataclass
defaults.  File problems (missing, a directory, a FIFO or device, over 1 MiB, unreadable, not UTF-8,
invalid TOML, nested more than 32 levels) and values of the wrong shape (a list where a name
belongs, ...) are :class:`ConfigError` too.

Round trips: ``ExperimentConfig.from_dict(cfg.to_dict()) == cfg`` and the same through
``to_json``/``from_json`` and ``to_toml``/``from_toml``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .sections import (  # noqa: F401  (the public names are re-exported here)
    ConfigError, LMConfig, LM_MAX_TEXTS, LM_METHODS, MATCHED_BUDGET_RULES, MINILM_TARGETS,
    PERTURB_KINDS, PerturbConfig, PlantedConfig, REAL_MODELS, SCALE_CONTROLS, SECTIONS,
    SMOLLM_LAYERS, TRAIN_METHODS, TRAIN_TASKS, TWIN_MODELS, TWIN_OPTIMIZERS, TrainConfig,
    TwinsConfig, _fail, _split_fits)
from .files import FileProblem, parse_json, parse_toml, read_regular_file

from .settings import UserSetting

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
OPTIONAL = {"setting": UserSetting}          # optional tables: absent from the profiles
MAX_CONFIG_BYTES = 1 << 20      # the profiles are ~5 KB; a bigger "config" is a mistake (or /dev/zero)


@dataclass
class ExperimentConfig:
    """The whole configuration: a profile name plus one validated dataclass per section."""

    profile: str = "custom"
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    twins: TwinsConfig = field(default_factory=TwinsConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    planted: PlantedConfig = field(default_factory=PlantedConfig)
    setting: UserSetting | None = None

    def __post_init__(self):
        if not isinstance(self.profile, str) or not self.profile:
            _fail("profile", "a non-empty string", self.profile)
        for name, cls in {**SECTIONS, **OPTIONAL}.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            elif not isinstance(value, cls) and not (name in OPTIONAL and value is None):
                _fail(name, f"a {cls.__name__} or a table", value)
        _split_fits("twins.tasks", self.twins.tasks, self.train.n_val, self.train.n_test)   # twins use train's split

    # -- dict / JSON / TOML
    def to_dict(self) -> dict:
        out = {"profile": self.profile, **{name: getattr(self, name).to_dict() for name in SECTIONS}}
        out.update({name: getattr(self, name).to_dict() for name in OPTIONAL if getattr(self, name) is not None})
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "ExperimentConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"config: must be a table, got {data!r}")
        unknown = sorted(set(data) - {"profile", *SECTIONS, *OPTIONAL})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown top-level key (unknown: {unknown}); accepted: "
                              f"'profile', 'extends' (files only), sections {sorted(SECTIONS)} and the "
                              f"optional {sorted(OPTIONAL)}")
        sections = {}
        for name in SECTIONS:
            if name not in data:
                continue
            _check_shapes(name, data[name])
            try:
                sections[name] = SECTIONS[name].from_dict(data[name])
            except ConfigError:
                raise
            except (TypeError, ValueError) as err:     # a validator tripped over an odd value
                raise ConfigError(f"[{name}]: invalid value ({err})") from None
        for name, kind in OPTIONAL.items():
            if name in data:
                sections[name] = kind.from_dict(data[name])
        return cls(profile=data.get("profile", "custom"), **sections)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ExperimentConfig":
        try:
            data = parse_json(text.encode("utf-8") if isinstance(text, str) else text)
        except FileProblem as err:
            raise ConfigError(f"config: {err}") from None
        return cls.from_dict(data)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> "ExperimentConfig":
        return cls.from_dict(_resolve_extends(_parse_toml(text, "<string>"), "<string>"))


# ----------------------------------------------------------------------------- loading
def _shape(value) -> str:
    """'table', 'list of lists', 'list' or 'scalar': the coarse JSON shape of a config value."""
    if isinstance(value, dict):
        return "table"
    if isinstance(value, (list, tuple)):
        return "list of lists" if value and all(isinstance(v, (list, tuple)) for v in value) else "list"
    return "scalar"


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_shapes(section: str, table) -> None:
    """Each field of a ``[section]`` table has its default's shape (a name where a name belongs, a
    list of scalars where a list belongs, ...), so a value of the wrong shape is refused naming the
    field before any validator sees it.  Unknown keys are left to the section's own check."""
    if not isinstance(table, dict):
        return
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name not in table:
            continue
        want, value = _default(f), table[f.name]
        if want is None or want is dataclasses.MISSING:          # no default shape to compare with
            continue
        if isinstance(want, (list, tuple)) and want and isinstance(want[0], (list, tuple)):
            ok = isinstance(value, list) and all(isinstance(v, list) and all(_shape(x) == "scalar" for x in v)
                                                 for v in value)
            what = "a list of lists of scalars"
        elif isinstance(want, (list, tuple)):
            ok = isinstance(value, list) and all(_shape(v) == "scalar" for v in value)
            what = "a list of scalars"
        else:
            ok = _shape(value) == "scalar"
            what = f"a single {type(want).__name__} (not a list or table)"
        if not ok:
            _fail(f"{section}.{f.name}", what, value)


def _check_complete(data: dict, origin: str) -> None:
    """A config without ``extends`` must give every section and every field: nothing may silently
    come from the dataclass defaults, which match neither profile."""
    hint = f'or start the file with extends = "<profile>" (profiles: {available_profiles()})'
    if not data or set(data) <= {"profile"}:
        raise ConfigError(f"{origin}: empty config; give every section {sorted(SECTIONS)} with every field, {hint}")
    missing = []
    for name, cls in SECTIONS.items():
        table = data.get(name)
        if table is None:
            missing.append(f"[{name}]")
        elif isinstance(table, dict):
            missing += [f"{name}.{f.name}" for f in dataclasses.fields(cls) if f.name not in table]
    if missing:
        shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
        raise ConfigError(f"{origin}: a config without `extends` must be complete; missing {shown}; add them {hint}")


def _read_text(path: Path) -> str:
    """A config file's text: a regular file of at most :data:`MAX_CONFIG_BYTES` (a FIFO or a device
    is refused, not read); any file-system or encoding problem is a :class:`ConfigError`."""
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"config: file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config: {path} is a directory, not a TOML file") from None
    except FileProblem as err:
        raise ConfigError(f"config: {path} is {err}; a config is a TOML file") from None
    except OSError as err:                     # permissions, name too long, ...
        raise ConfigError(f"config: cannot read {path}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (TOML files are UTF-8): byte {raw[err.start]:#04x} "
                          f"at offset {err.start}") from None


def _parse_toml(text: str, origin: str) -> dict:
    try:
        return parse_toml(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{origin}: invalid TOML: {err}") from None
    except FileProblem as err:
        raise ConfigError(f"{origin}: {err}") from None


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def _resolve_extends(data: dict, origin: str, _seen: tuple = ()) -> dict:
    """Merge ``data`` over the profile it ``extends``; a file without ``extends`` must be complete."""
    parent = data.pop("extends", None)
    if parent is None:
        _check_complete(data, origin)
        return data
    if not isinstance(parent, str) or parent not in available_profiles():
        raise ConfigError(f"extends: must be a profile name from {available_profiles()}, got {parent!r}")
    if parent in _seen:
        raise ConfigError(f"extends: profiles extend each other in a cycle: {' -> '.join([*_seen, parent])}")
    base = _profile_dict(parent, _seen)
    merged = _deep_merge(base, data)
    if "profile" not in data:
        merged["profile"] = f"{parent}+{Path(origin).stem}"
    return merged


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def _profile_dict(name: str, _seen: tuple = ()) -> dict:
    if not isinstance(name, str) or name not in available_profiles():
        raise ConfigError(f"profile: unknown profile {name!r}; available: {available_profiles()}")
    path = PROFILES_DIR / f"{name}.toml"
    data = _parse_toml(_read_text(path), str(path))
    data.setdefault("profile", name)
    return _resolve_extends(data, str(path), (*_seen, name))


def load_profile(name: str) -> ExperimentConfig:
    """The named profile (``quick`` or ``paper``) from ``analysis/profiles/<name>.toml``."""
    return ExperimentConfig.from_dict(_profile_dict(name))


def load_config_file(path: str | Path) -> ExperimentConfig:
    """A TOML config file: ``extends = "<profile>"`` plus overrides, or complete on its own (every
    section and field; an empty or partial file without ``extends`` is refused, naming what is missing)."""
    path = Path(path)
    data = _parse_toml(_read_text(path), str(path))
    if "extends" not in data:
        data.setdefault("profile", path.stem)
    return _with_paths_from(ExperimentConfig.from_dict(_resolve_extends(data, str(path))), path)


def _with_paths_from(config: ExperimentConfig, path: Path) -> ExperimentConfig:
    """Relative paths of a user ``[setting]`` are relative to the config file that names them."""
    if config.setting is not None:
        config.setting = config.setting.resolved(Path(path).resolve().parent)
    return config


def load_config(profile: str | None = "quick", path: str | Path | None = None) -> ExperimentConfig:
    """``path`` if given (a file without ``extends`` is complete on its own; with ``--profile`` also
    given, the file is applied on top of that profile), else the named profile."""
    if path is None:
        return load_profile(profile or "quick")
    path = Path(path)
    if profile is None:
        return load_config_file(path)
    data = _parse_toml(_read_text(path), str(path))
    data.setdefault("extends", profile)
    return _with_paths_from(ExperimentConfig.from_dict(_resolve_extends(data, str(path))), path)


# ----------------------------------------------------------------------------- TOML writer
def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"cannot write non-finite float {v!r} to TOML")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)      # JSON string escapes are valid TOML basic strings
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {type(v).__name__} value {v!r} to TOML")


def dumps_toml(data: dict) -> str:
    """Minimal TOML writer for config dicts (scalars and lists at top level, one level of tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"
