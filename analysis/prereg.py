"""The preregistration (``analysis/preregistration.toml``, docs/method.md §5): loaded, validated and
hashed for the report.  Pure data (no torch)."""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .methods import METHODS, TAGS

PATH = Path(__file__).resolve().parent / "preregistration.toml"
PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
EMPIRICAL = ("C5", "C6", "C7", "C9", "C11", "C12", "C13")


def file_sha256(path: Path) -> str:
    """SHA-256 of a text file with its line endings normalised to LF (a checkout on Windows hashes the same)."""
    return hashlib.sha256(Path(path).read_bytes().replace(b"\r\n", b"\n")).hexdigest()


@dataclass(frozen=True)
class Preregistration:
    version: int
    registered: str
    sha256: str
    rules: dict
    controls: dict
    margins: dict
    deciding: dict
    profiles: dict
    deviations: list = field(default_factory=list)

    def margin_rule(self, name: str) -> float:
        """A declared margin rule (``loss_fraction`` …); ``KeyError`` naming the declared ones."""
        if name not in self.margins:
            raise KeyError(f"margin rule {name!r} is not preregistered; declared: {sorted(self.margins)}")
        return float(self.margins[name])

    def control(self, name: str) -> float:
        if name not in self.controls:
            raise KeyError(f"control {name!r} is not preregistered; declared: {sorted(self.controls)}")
        return float(self.controls[name])

    def deciding_for(self, claim: str) -> tuple[str, ...]:
        if claim not in self.deciding:
            raise KeyError(f"claim {claim!r} has no preregistered deciding comparisons; declared: {sorted(self.deciding)}")
        return tuple(self.deciding[claim])

    def profile_deviation(self, name: str, path: Path | None = None) -> str | None:
        """``None`` when profile ``name`` matches its registered hash, else a one-line deviation."""
        path = Path(path) if path is not None else PROFILES_DIR / f"{name}.toml"
        pinned = self.profiles.get(name)
        if pinned is None:
            return f"profile {name!r} is not preregistered (registered: {sorted(self.profiles)})"
        if not path.is_file() or file_sha256(path) != pinned:
            return f"profile {name!r} differs from the version registered in preregistration v{self.version}"
        return None


def load(path: Path = PATH) -> Preregistration:
    """The preregistration, validated: every section present, numbers in range, deciding entries known
    to the method registry (tags, or for C13 a method name)."""
    path = Path(path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in ("version", "registered", "rules", "controls", "margins", "deciding", "profiles") if k not in data]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    if not isinstance(data["version"], int) or data["version"] < 1:
        raise ValueError(f"{path}: version must be a positive int, got {data['version']!r}")
    for section in ("controls", "margins"):
        for key, value in data[section].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{path}: {section}.{key} must be a positive number, got {value!r}")
    for claim in EMPIRICAL:
        entries = data["deciding"].get(claim)
        if not entries:
            raise ValueError(f"{path}: deciding.{claim} must list the deciding baselines")
        unknown = [e for e in entries if e not in TAGS and e not in METHODS]
        if unknown:
            raise ValueError(f"{path}: deciding.{claim} has unknown entries {unknown} (registry tags or method names)")
    deviations = data.get("deviations", [])
    for d in deviations:
        if not {"version", "change", "reason"} <= set(d):
            raise ValueError(f"{path}: every [[deviations]] entry needs version, change and reason, got {d}")
    return Preregistration(data["version"], str(data["registered"]), file_sha256(path), dict(data["rules"]),
                           dict(data["controls"]), dict(data["margins"]), dict(data["deciding"]),
                           dict(data["profiles"]), list(deviations))
