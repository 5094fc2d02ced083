"""The preregistration (analysis/preregistration.toml, analysis/prereg.py): complete, valid, consistent
with the method registry and the claims, and pinning the committed profiles — so a profile cannot
change without a new preregistration version."""
import re
import shutil
from pathlib import Path

import pytest

from analysis import methods, prereg

ROOT = Path(__file__).resolve().parents[1]


def test_it_loads_and_every_empirical_claim_has_deciding_baselines_that_exist():
    reg = prereg.load()
    assert reg.version >= 1 and re.fullmatch(r"[0-9a-f]{64}", reg.sha256)
    for claim in prereg.EMPIRICAL:
        for entry in reg.deciding_for(claim):
            assert methods.tagged(entry) if entry in methods.TAGS else entry in methods.METHODS, (claim, entry)
    assert 0 < reg.control("p2_max_entropy") <= 0.9                    # the spec's ceiling
    assert reg.control("p1_gain_over_margin") >= 5
    for rule in ("loss_fraction", "accuracy_fraction", "gini_fraction", "churn_fraction", "amplification_log"):
        assert 0 < reg.margin_rule(rule) <= 1
    with pytest.raises(KeyError, match="not preregistered"):
        reg.margin_rule("c6_gini")


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_the_committed_profiles_are_the_registered_ones(name):
    """Editing a profile (settings, grids, seeds, steps) needs a new preregistration version with its
    reason: this fails until the pin is updated together with the version and a [[deviations]] entry."""
    reg = prereg.load()
    assert reg.profile_deviation(name) is None, (
        f"analysis/profiles/{name}.toml differs from its pin in preregistration v{reg.version}: "
        f"bump the version, record the change and its reason under [[deviations]], update the pin")


def test_a_changed_profile_is_reported_as_a_deviation(tmp_path):
    reg = prereg.load()
    copy = tmp_path / "quick.toml"
    shutil.copy(ROOT / "analysis" / "profiles" / "quick.toml", copy)
    assert reg.profile_deviation("quick", copy) is None
    copy.write_text(copy.read_text().replace("steps = 800", "steps = 801"))
    assert "differs from the version registered" in reg.profile_deviation("quick", copy)
    assert "not preregistered" in reg.profile_deviation("nightly", copy)
    crlf = tmp_path / "crlf.toml"                 # a Windows checkout hashes the same
    crlf.write_bytes((ROOT / "analysis" / "profiles" / "quick.toml").read_bytes().replace(b"\n", b"\r\n"))
    assert reg.profile_deviation("quick", crlf) is None


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("version = 1", "version = 0"), "version must be a positive int"),
    (lambda t: t.replace("p2_max_entropy = 0.9", "p2_max_entropy = -0.9"), "controls.p2_max_entropy"),
    (lambda t: t.replace('C9 = ["function-matched"]', 'C9 = ["no-such-tag"]'), "deciding.C9 has unknown"),
    (lambda t: t.replace('C9 = ["function-matched"]\n', ""), "deciding.C9 must list"),
    (lambda t: t.replace("[margins]", "[margin]"), "missing ['margins']"),
])
def test_an_invalid_preregistration_is_refused(tmp_path, edit, message):
    path = tmp_path / "preregistration.toml"
    path.write_text(edit(prereg.PATH.read_text()))
    with pytest.raises(ValueError, match=re.escape(message)):
        prereg.load(path)
