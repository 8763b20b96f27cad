"""The generalisation study driver on a tiny random model: points, figures, resume without reloading, verdict."""
import dataclasses
import json
import sys

import pytest

import introspection_experiment as ie
from conftest import ROOT

sys.path.insert(0, str(ROOT / "studies"))
import generalization_study as study  # noqa: E402


TINY = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1",
        "--control-trials", "2", "--random-vectors", "2", "--eval-strengths", "1x", "--max-new-tokens", "3"]


@pytest.fixture
def concepts(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps({"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}))
    return str(path)


def test_scaling_points_figure_resume_and_summary(tmp_path, concepts, monkeypatch):
    args = ["scaling", "--points", "2", "3", "--vector-tokens", "prompt-end", "--random-negatives", "0", "0.5",
            "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), *TINY, "--concepts-file", concepts]
    assert study.main(args) == 0
    result = json.loads((tmp_path / "fig" / "scaling_study.json").read_text())
    assert [c["name"] for c in result["curves"]] == ["prompt-end vectors", "prompt-end vectors, 0.5 random negatives"]
    assert [p["num_train_concepts"] for p in result["curves"][1]["points"]] == [2, 3]
    assert "RANDOM WEIGHTS" in result["model"] and (tmp_path / "fig" / "scaling_study.png").exists()
    trained = json.loads((tmp_path / "runs" / "scaling" / "prompt-end-rn0.5-n3" / "metrics.json").read_text())
    assert trained["settings"]["num_train_concepts"] == 3 and trained["settings"]["random_negatives"] == 2  # round(0.5 * 3 negatives)
    assert trained["settings"]["scoring"] == "logprob"

    def no_loading(cfg):
        raise AssertionError("a finished point must not load the model")

    monkeypatch.setattr(ie, "load_model", no_loading)
    assert study.main(args) == 0  # every point finished: read back
    assert json.loads((tmp_path / "fig" / "scaling_study.json").read_text())["curves"] == result["curves"]
    assert study.main(["summary", "--figures", str(tmp_path / "fig")]) == 0
    text = (tmp_path / "fig" / "study_summary.md").read_text()
    assert "| prompt-end vectors, 0.5 random negatives | 3 |" in text and "Goal" in text


def test_goal_check_uses_each_bound():
    r = lambda x: {"rate": x}  # noqa: E731
    assert study.meets(r(0.7), study.GOAL["held-out identification"])
    assert not study.meets(r(0.69), study.GOAL["held-out identification"])
    assert study.meets(r(0.1), study.GOAL["random-vector 'detection'"])
    assert not study.meets(r(0.03), study.GOAL["control false positives"])
    assert not study.meets(r(None), study.GOAL["control false positives"])


def test_controls_table_lists_every_state(tmp_path, concepts):
    args = ["controls", "--points", "2", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), *TINY,
            "--concepts-file", concepts]
    monkey_protocols = study.CONTROL_PROTOCOLS
    study.CONTROL_PROTOCOLS = monkey_protocols[:2]
    try:
        assert study.main(args) == 0
    finally:
        study.CONTROL_PROTOCOLS = monkey_protocols
    table = (tmp_path / "fig" / "controls_table.md").read_text()
    assert table.count("| base |") == 2 and table.count("| finetuned |") == 2


def test_a_shared_model_gives_the_same_results_as_a_fresh_one(tmp_path, concepts):
    """run(cfg, loaded) hands the model back without adapters: a point run after another equals a fresh run."""
    base = ie.config_from_args(TINY + ["--concepts-file", concepts, "--skip-safety"])
    first = dataclasses.replace(base, output_dir=str(tmp_path / "first"), random_negatives=0.5)
    second = dataclasses.replace(base, output_dir=str(tmp_path / "second"), vector_token="word")
    loaded = ie.load_model(first)
    ie.run(first, loaded)
    ie.run(second, loaded)
    fresh = dataclasses.replace(second, output_dir=str(tmp_path / "fresh"))
    ie.run(fresh)
    assert ie.read_jsonl(tmp_path / "second" / "trials.jsonl") == ie.read_jsonl(tmp_path / "fresh" / "trials.jsonl")
    assert not any("lora" in name for name, _ in loaded[0].named_modules())
