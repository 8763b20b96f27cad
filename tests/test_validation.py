"""Bad input is refused in one line with exit 2 before the model loads (and before the run directory is claimed)."""
import json
import time

import pytest

import introspection_experiment as ie
from conftest import load_paper_tables

TINY = ["--model", "random:tiny", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Any test here that reaches the model load fails."""
    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(ie, "load_model", refuse)
    ie.model_depth.cache_clear()
    yield
    ie.model_depth.cache_clear()


def refused(args, caplog, *words, main=ie.main) -> bool:
    """Whether `args` (to `main`) exit 2 with one error line containing `words`, no traceback."""
    caplog.clear()
    code = main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return (code == 2 and len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
            and all(w in errors[0] for w in words))


def concepts_file(tmp_path, **lists) -> str:
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps({"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"],
                                **lists}))
    return str(path)


@pytest.mark.parametrize("extra,words", [
    (["--train-strengths", "0"], ["bad strength '0'", "> 0"]),
    (["--eval-strengths", "40", "0x"], ["bad strength '0x'"]),
    (["--train-strengths", "inf"], ["bad strength 'inf'"]),
    (["--train-strengths", "nan"], ["bad strength 'nan'"]),
    (["--lr", "-1"], ["--lr must be a finite number > 0"]),
    (["--lr", "0"], ["--lr must be"]),
    (["--lora-dropout", "1.5"], ["--lora-dropout", "0 <= p < 1"]),
    (["--lora-dropout", "1"], ["--lora-dropout"]),
    (["--lora-dropout", "-0.1"], ["--lora-dropout"]),
    (["--control-temperature", "-1"], ["--control-temperature must be a finite number >= 0"]),
    (["--layer", "4"], ["--layer 4 is out of range", "0..3"]),
    (["--layer", "-1"], ["out of range"]),
])
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, caplog, extra, words):
    assert refused(TINY + extra + ["--output-dir", str(tmp_path / "run")], caplog, *words)
    assert not (tmp_path / "run").exists()


def test_the_layer_range_comes_from_the_model_config_without_its_weights(tmp_path, caplog):
    """The embedded model's 30 layers are read from its GGUF metadata; no weights are loaded (load_model refuses)."""
    assert refused(["--model", ie.EMBEDDED_MODEL, "--layer", "30", "--output-dir", str(tmp_path / "run")], caplog,
                   "--layer 30 is out of range", "0..29")


@pytest.mark.parametrize("lists,words", [
    ({"heldout": ["Fire"]}, ["duplicate concept 'fire'"]),
    ({"heldout": [" fire "]}, ["duplicate concept 'fire'"]),
    ({"heldout": ["fires"]}, ["held-out concept 'fires'", "training concept 'fire'"]),
    ({"train": ["wolf"], "heldout": ["wolves"]}, ["held-out concept 'wolves'", "'wolf'"]),
    ({"train": ["galaxies"], "heldout": ["galaxy"]}, ["held-out concept 'galaxy'", "'galaxies'"]),
])
def test_held_out_concepts_the_grader_cannot_tell_from_training_ones(tmp_path, caplog, lists, words):
    args = TINY + ["--concepts-file", concepts_file(tmp_path, **lists), "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, *words)


def test_concept_lists_are_stripped_and_lower_cased(tmp_path):
    cfg = ie.Config(concepts_file=concepts_file(tmp_path, train=[" Fire ", "OCEAN"], heldout=["Volcano"]))
    assert ie.load_concepts(cfg) == {"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}
    assert ie.load_concepts(ie.Config())["train"] == ie.TRAIN_CONCEPTS  # the paper's lists are unchanged


def test_vocabulary_words_sharing_a_form_with_a_held_out_concept_are_not_drawn(tmp_path):
    word = ie.vocabulary()[0]
    cfg = ie.Config(concepts_file=concepts_file(tmp_path, heldout=[word + "s"]), num_train_concepts=10)
    train = ie.load_concepts(cfg)["train"]
    assert word not in train and len(train) == 10


@pytest.mark.parametrize("text,words", [("", ["cannot read run metrics"]), ("{}", ["not a run's metrics"]),
                                        ("[]", ["not a run's metrics"])])
def test_paper_tables_from_an_empty_or_foreign_json(tmp_path, caplog, monkeypatch, text, words):
    tables = load_paper_tables()
    monkeypatch.setattr(tables, "PAPER_DIR", tmp_path / "paper")
    (tmp_path / "metrics.json").write_text(text)
    assert refused([str(tmp_path / "metrics.json")], caplog, *words, main=tables.main)
    assert not (tmp_path / "paper").exists()


def test_unknown_hub_model_offline_fails_fast(tmp_path, caplog):
    start = time.perf_counter()
    assert refused(["--model", "no-such-org/no-such-model-xyz", "--output-dir", str(tmp_path / "run")], caplog,
                   "cannot load model 'no-such-org/no-such-model-xyz'", "HF_HUB_OFFLINE")
    assert time.perf_counter() - start < 5


def test_unreachable_hub_fails_fast_without_retries(tmp_path, caplog, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    assert refused(["--model", "no-such-org/no-such-model-xyz", "--output-dir", str(tmp_path / "run")], caplog,
                   "cannot load model", "cannot be reached")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("text,words", [('{"config": {"mod', ["config.json", "unreadable"]),
                                        ("[]", ["config.json", "not a run config"])])
def test_a_corrupt_config_json_is_one_line(tmp_path, caplog, text, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    assert refused(TINY + ["--output-dir", str(tmp_path / "run")], caplog, *words)
