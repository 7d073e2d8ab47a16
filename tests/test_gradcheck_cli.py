"""``dtrain gradcheck``: passes on every model, and catches a wrong gradient rule."""

from __future__ import annotations

import pytest

from dtrain.commands import gradcheck as check
from dtrain.graph import engine
from tests.conftest import launch


def test_gradcheck_passes_through_the_console(tmp_path) -> None:
    proc = launch("gradcheck", "model=graph", cwd=tmp_path)  # python -m dtrain gradcheck model=graph
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:6]] == ["c0", "c1", "c2", "c3", "c4"]
    assert "gradcheck passed" in lines[-1]
    assert not (tmp_path / "outputs").exists()  # a check writes nothing


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=polynomial"],
        ["model=mlp", "model.hidden=[4]", "model.layer_norm=true", "model.activation=gelu"],
        ["model=mlp", "model.hidden=[4]", "data=moons"],
        ["model=graph", "model.graph=mlp", "model.hidden=[4]", "data=moons", "model.activation=relu"],
        ["model=graph", "model.graph=mlp", "model.hidden=[4]", "data=sine", "model.activation=sigmoid"],
    ],
)
def test_gradcheck_passes_for_correct_models(overrides: list[str], capsys) -> None:
    assert check.main(["--samples", "8", *overrides]) == 0
    assert "gradcheck passed" in capsys.readouterr().out


def test_gradcheck_catches_a_wrong_gradient_rule(monkeypatch, capsys) -> None:
    wrong = engine.Op("tanh", engine.TANH.forward, lambda g, z, a: (2 * g * (1 - z * z),))
    monkeypatch.setattr(engine, "TANH", wrong)
    code = check.main(["--samples", "8", "model=graph", "model.graph=mlp", "model.hidden=[3]", "data=sine"])
    assert code == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "gradcheck failed" in out.err


def test_gradcheck_reports_bad_overrides_in_one_line(tmp_path) -> None:
    proc = launch("gradcheck", "model.degree=0", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dtrain: error: model.degree=0 must be at least 1"
