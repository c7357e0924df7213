"""`init --fidelity`: the strength is searched down from the ceiling until trial copies meet the target,
the trade-off is recorded, a target that cannot be met with a margin is refused before anything is
written, and `issue` never writes a copy below the target (it weakens that copy's mark first)."""

import json
import shutil
import sqlite3

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from wmtrace import api, fidelity, modelio
from wmtrace.cli import app
from wmtrace.errors import BadInput
from wmtrace.schemes.whitebox import Config, calibrate

DATA = "tests.smalldata:dataset"
FACTORY = "wmtrace.example:build"


def _agreement(m, path) -> float:
    model = modelio.build_model(m)
    copy = modelio.build_model(m)
    copy.load_state_dict(load_file(path), strict=False)
    x, _ = modelio.tensors(modelio.dataset(DATA, "test"))
    return fidelity.agreement(model, copy, x)


def test_default_target_is_met_at_the_ceiling_and_recorded(tmp_path, master_file):
    reg = api.open_registry(tmp_path / "reg", create=True)
    m = api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"])
    cal = Config.of(m).calibration
    assert m.config.fidelity == calibrate.DEFAULT_TARGET["logits"]
    assert cal is not None and cal.strength == 0.2 and len(cal.trials) == 1
    assert cal.chosen.fidelity >= 0.99 and cal.chosen.robust
    assert Config.of(m).embed.strength == 0.2


def test_a_too_strong_ceiling_is_stepped_down_until_copies_meet_the_target(tmp_path, master_file):
    reg = api.open_registry(tmp_path / "reg", create=True)
    m = api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"], strength=1.0,
                 fidelity_target=0.995)
    cal = Config.of(m).calibration
    assert cal.trials[0].strength == 1.0 and cal.trials[0].fidelity < 0.995  # the ceiling costs too much here
    assert cal.strength < 1.0 and cal.chosen.fidelity >= 0.995 and cal.chosen.robust
    assert [t.strength for t in cal.trials] == sorted((t.strength for t in cal.trials), reverse=True)
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out")
    assert b.agreement >= 0.995 and _agreement(m, b.file) >= 0.995
    assert api.trace(b.file, reg).buyer["id"] == b.id


def test_a_target_met_only_without_margin_is_refused_and_nothing_is_written(tmp_path, master_file, monkeypatch):
    monkeypatch.setattr(calibrate, "MIN_MARGIN", 1.5)  # more than any bit keeps after 80% pruning + int8
    root = tmp_path / "reg"
    reg = api.open_registry(root, create=True)
    with pytest.raises(BadInput, match="no mark strength meets fidelity 0.99 and survives") as e:
        api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"])
    assert "0.2: " in str(e.value) and "no strength tried keeps a margin" in str(e.value)
    assert "--fidelity 0 --strength" in str(e.value)
    assert reg.masters() == []
    assert not any(p.suffix == ".key" for p in root.rglob("*"))


def test_no_target_skips_the_search_and_the_gate(tmp_path, master_file):
    reg = api.open_registry(tmp_path / "reg", create=True)
    m = api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"], fidelity_target=0,
                 strength=0.6)
    assert Config.of(m).calibration is None and m.config.fidelity is None
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out")
    assert b.margin == pytest.approx(1.0, abs=0.05)  # full strength: nothing asked it to weaken


def _raise_target(root, name: str, target: float) -> None:
    """A master whose recorded target is above what its strength gives (as after a data change)."""
    with sqlite3.connect(root / "wmtrace.db") as db:
        (config,) = db.execute("SELECT config FROM masters WHERE name = ?", (name,)).fetchone()
        config = json.loads(config) | {"fidelity": target}
        db.execute("UPDATE masters SET config = ? WHERE name = ?", (json.dumps(config), name))


def test_issue_weakens_a_copy_below_the_target_and_still_names_its_buyer(tmp_path, master_file):
    first, second = tmp_path / "a", tmp_path / "b"
    reg = api.open_registry(first, create=True)
    api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"], fidelity_target=0,
             strength=1.0)
    reg.close()
    shutil.copytree(first, second)  # same key: buyer 1 gets the same codeword in both
    (full,) = api.issue(api.open_registry(first), buyers=1, out=tmp_path / "full")
    target = round(full.agreement + 0.001, 4)  # just above what this codeword reaches at full strength
    assert target < 1.0
    _raise_target(second, "small", target)
    reg = api.open_registry(second)
    (b,) = api.issue(reg, buyers=1, out=tmp_path / "out")
    assert b.id == full.id and b.codeword == full.codeword
    assert b.agreement >= target
    assert b.margin < 0.9  # marked weaker than registered
    r = api.trace(b.file, reg)
    assert r.verdict == "identified" and r.buyer["id"] == b.id


def test_issue_refuses_a_copy_it_cannot_bring_to_the_target(tmp_path, master_file):
    root = tmp_path / "reg"
    reg = api.open_registry(root, create=True)
    api.init(reg, "small", master_file, FACTORY, data=DATA, scheme_names=["whitebox"], fidelity_target=0,
             strength=1.0)
    reg.close()
    _raise_target(root, "small", 0.9999)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["issue", "--buyers", "1", "--registry", str(root), "--out", str(out)])
    assert result.exit_code != 0
    assert "below the fidelity target 0.9999" in result.output and "Traceback" not in result.output
    assert not out.exists() or not any(out.iterdir())
    assert api.open_registry(root).buyers("small") == []


def test_cli_reports_the_trade_off_it_measured(tmp_path, master_file):
    root = tmp_path / "reg"
    result = CliRunner().invoke(app, ["init", "--name", "small", "--weights", str(master_file), "--model", FACTORY,
                                      "--data", DATA, "--schemes", "whitebox", "--strength", "1.0",
                                      "--fidelity", "0.995", "--registry", str(root)])
    assert result.exit_code == 0, result.output
    assert "trial strength 1:" in result.output and "mark strength for fidelity >= 0.995" in result.output
    result = CliRunner().invoke(app, ["init", "--name", "x", "--weights", str(master_file), "--model", FACTORY,
                                      "--data", DATA, "--fidelity", "1.5", "--registry", str(root)])
    assert result.exit_code != 0 and "fidelity" in result.output and "Traceback" not in result.output
