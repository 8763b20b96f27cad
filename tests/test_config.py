"""Stage 1, configuration: the command line, resolve_config, validation of every input before any work (one line, exit 2), and strength units."""
import json
import os
import re
import subprocess
import sys
import time
import logging

import pytest
import torch

import introspection_experiment as ie
import machinery
from machinery import models, rundir
from conftest import ROOT, SMALL_CONCEPTS, concepts_file, load_paper_tables, refused, run_main


def test_help_documents_every_config_field():
    out = subprocess.run([sys.executable, str(ROOT / "introspection_experiment.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for f in ie.dataclasses.fields(ie.Config):
        assert machinery.flag(f) + " " in out or machinery.flag(f) + "\n" in out


def test_default_model_falls_back_to_embedded_without_cuda(caplog):
    cfg = ie.resolve_config(ie.config_from_args([]))
    if torch.cuda.is_available():
        assert cfg.model == ie.PAPER_MODEL
    else:
        assert cfg.model == models.EMBEDDED_MODEL and "No CUDA device" in caplog.text
    assert ie.config_from_args(["--model", "some/model"]).model == "some/model"


@pytest.mark.parametrize("extra,message", [
    (["--model", "no-such-org/no-such-model-xyz"], "cannot load model 'no-such-org/no-such-model-xyz'"),
    (["--model", "random:huge"], "unknown random shape"),
    (["--model", "random:tiny", "--layer", "4"], "out of range"),
    (["--model", "random:tiny", "--layer", "-1"], "out of range"),
    (["--model", "random:tiny", "--train-strengths", "strong"], "bad strength"),
    (["--model", "random:tiny", "--epochs", "0"], "--epochs must be >= 1"),
    (["--model", "random:tiny", "--random-negatives", "1.5"], "between 0 and 1"),
    (["--model", "random:tiny", "--num-train-concepts", "100000"], "exceeds the"),
    (["--model", "random:tiny", "--seeds", "1", "1"], "must not repeat"),
])
def test_bad_input_is_one_clear_error(tmp_path, caplog, extra, message):
    code, text = run_main(extra + ["--output-dir", str(tmp_path / "run")], caplog)
    assert code == 2 and message in text and "Traceback" not in text
    assert not (tmp_path / "run" / "vectors.safetensors").exists()


@pytest.mark.parametrize("concepts,message", [
    ({"train": []}, "non-empty"),
    ({"train": ["fire", "fire"]}, "duplicate concept 'fire'"),
    ({"heldout": ["fire"]}, "duplicate concept 'fire'"),
    ({"colours": ["red"]}, "keys must be"),
])
def test_bad_concept_lists(tmp_path, caplog, concepts, message):
    code, text = run_main(["--model", "random:tiny", "--concepts-file", concepts_file(tmp_path, concepts),
                           "--output-dir", str(tmp_path / "run")], caplog)
    assert code == 2 and message in text


def test_unwritable_output_dir(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, text = run_main(["--model", "random:tiny", "--output-dir", str(blocker / "run")], caplog)
    assert code == 2 and "not writable" in text


@pytest.mark.parametrize("flags", [["--dtype", "float16"], ["--load-in-4bit"]])
def test_missing_gpu_for_gpu_only_option(caplog, tmp_path, flags):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    code, text = run_main(["--model", "random:tiny", *flags, "--output-dir", str(tmp_path)], caplog)
    assert code == 2 and "needs a CUDA GPU" in text and "Traceback" not in text


def test_seeds_flag_parses_to_ints():
    assert ie.config_from_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]


def test_strength_parsing():
    assert ie.parse_strength("40") == (40.0, "absolute")
    assert ie.parse_strength("1.5x") == (1.5, "norm")
    assert ie.resolve_alpha("2x", 100.0) == 200.0
    with pytest.raises(machinery.ConfigError):
        ie.parse_strength("strong")


def test_vocabulary_is_large_balanced_and_disjoint_from_the_paper_lists():
    words = ie.vocabulary()
    categories = json.loads(ie.VOCABULARY_FILE.read_text())["categories"]
    assert len(words) >= 500 and len(set(words)) == len(words) == sum(map(len, categories.values()))
    reserved = set(ie.TRAIN_CONCEPTS + ie.HELDOUT_CONCEPTS + ie.BASELINE_WORDS)
    reserved |= {w for ws in ie.SAFETY_CATEGORIES.values() for w in ws}
    assert not reserved & set(words)
    first = words[:len(categories)]  # interleaved: the first words cover every category once
    assert {next(c for c, ws in categories.items() if w in ws) for w in first} == set(categories)


def test_num_train_concepts_extends_the_paper_list_with_the_vocabulary():
    concepts = ie.load_concepts(ie.Config(num_train_concepts=100))
    assert concepts["train"][:40] == ie.TRAIN_CONCEPTS and concepts["train"][40:] == ie.vocabulary()[:60]
    assert ie.load_concepts(ie.Config(num_train_concepts=10))["train"] == ie.TRAIN_CONCEPTS[:10]
    assert concepts["heldout"] == ie.HELDOUT_CONCEPTS


def test_default_layer_is_two_thirds_depth():
    """Read from the model's configuration, no weights loaded: 30 layers -> 20, 4 -> 2, the embedded model's 30 from
    its GGUF metadata."""
    assert ie.resolve_config(ie.Config(model="random:deepseek-llm-7b")).layer == 20
    assert ie.resolve_config(ie.Config(model="random:tiny")).layer == 2
    assert ie.resolve_config(ie.Config(model=models.EMBEDDED_MODEL)).layer == 20


def test_config_is_resolved_once_before_anything_runs(caplog):
    """resolve_config decides every model-dependent value (no weights loaded), is idempotent, and the hash covers the
    resolved config: leaving a default out or writing it in gives the same run."""
    given = ie.Config(model="random:tiny", eval_strengths=["1x"])
    resolved = ie.resolve_config(given)
    assert (resolved.layer, resolved.train_strengths, resolved.eval_strengths) == (2, ie.NORM_STRENGTHS, ["1x"])
    assert ie.resolve_config(resolved) == resolved
    explicit = ie.Config(model="random:tiny", layer=2, train_strengths=ie.NORM_STRENGTHS, eval_strengths=["1x"])
    assert rundir.config_hash(ie.resolve_config(explicit)) == rundir.config_hash(resolved) != rundir.config_hash(given)
    assert ie.resolve_config(ie.Config(model=models.EMBEDDED_MODEL)).train_strengths == ie.NORM_STRENGTHS


def test_run_writes_the_resolved_config(tmp_path, caplog):
    """config.json holds what ran (layer and strengths filled in), checked before the model is loaded: a bad layer
    fails with nothing written but the folder."""
    code, text = run_main(["--model", "random:tiny", "--layer", "9", "--output-dir", str(tmp_path / "bad")], caplog)
    assert code == 2 and "out of range" in text and not (tmp_path / "bad").exists()


TINY = ["--model", "random:tiny", "--dtype", "float32"]


@pytest.fixture
def no_model_load(monkeypatch):
    """Any test here that reaches the model load fails."""
    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(ie, "load_model", refuse)
    models.model_depth.cache_clear()
    yield
    models.model_depth.cache_clear()


def lists_file(tmp_path, **lists) -> str:
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
    # a strength listed twice, by value: its trials would count twice (n doubled, intervals too narrow)
    (["--eval-strengths", "1x", "1x"], ["--eval-strengths lists one strength twice", "'1x' and '1x'"]),
    (["--eval-strengths", "1x", "1.0x", "1X"], ["--eval-strengths lists one strength twice", "'1x' and '1.0x'"]),
    (["--train-strengths", "40", "40.0"], ["--train-strengths lists one strength twice", "'40' and '40.0'"]),
    # norm multiples are bounded like absolute alphas (1e-30x would be alpha = 0: positives with no injection)
    (["--eval-strengths", "1e-30x"], ["--eval-strengths 1e-30x", "outside 0.05x-10x", "--force-strengths"]),
    (["--train-strengths", "1x", "1e30x"], ["--train-strengths 1e30x", "outside 0.05x-10x"]),
    (["--eval-strengths", "0x", "--force-strengths"], ["bad strength '0x'"]),
    # seeds outside the seeding libraries' range (a traceback after the model load, and a folder left behind)
    (["--seed", "-1"], ["--seed -1 is out of range", "0 to 4294967295"]),
    (["--seed", "4294967296"], ["--seed 4294967296 is out of range"]),
    (["--seeds", "0", "4294967296"], ["--seeds 4294967296 is out of range"]),
    (["--seeds", "-5", "1"], ["--seeds -5 is out of range"]),
])
@pytest.mark.usefixtures("no_model_load")
def test_bad_settings_are_refused_before_the_model_loads(tmp_path, caplog, extra, words):
    assert refused(TINY + extra + ["--output-dir", str(tmp_path / "run")], caplog, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_model_load")
def test_the_layer_range_comes_from_the_model_config_without_its_weights(tmp_path, caplog):
    """The embedded model's 30 layers are read from its GGUF metadata; no weights are loaded (load_model refuses)."""
    assert refused(["--model", models.EMBEDDED_MODEL, "--layer", "30", "--output-dir", str(tmp_path / "run")], caplog,
                   "--layer 30 is out of range", "0..29")


@pytest.mark.parametrize("lists,words", [
    ({"heldout": ["Fire"]}, ["duplicate concept 'fire'"]),
    ({"heldout": [" fire "]}, ["duplicate concept 'fire'"]),
    ({"heldout": ["fires"]}, ["held-out concept 'fires'", "training concept 'fire'"]),
    ({"train": ["wolf"], "heldout": ["wolves"]}, ["held-out concept 'wolves'", "'wolf'"]),
    ({"train": ["galaxies"], "heldout": ["galaxy"]}, ["held-out concept 'galaxy'", "'galaxies'"]),
])
@pytest.mark.usefixtures("no_model_load")
def test_held_out_concepts_the_grader_cannot_tell_from_training_ones(tmp_path, caplog, lists, words):
    args = TINY + ["--concepts-file", lists_file(tmp_path, **lists), "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, *words)


@pytest.mark.parametrize("lists,words", [
    ({"heldout": ["thought"]}, ["concept 'thought' in 'heldout'", "answer templates", "'thought'"]),
    ({"heldout": ["Thoughts"]}, ["concept 'thoughts' in 'heldout'", "'thought'"]),
    ({"heldout": ["about"]}, ["concept 'about'"]),
    ({"heldout": ["halting"]}, ["concept 'halting'"]),
    ({"train": ["fire", "harmful"]}, ["concept 'harmful' in 'train'"]),
    ({"train": ["fire", "injected thought"]}, ["concept 'injected thought' in 'train'"]),
    ({"heldout": ["sense"]}, ["concept 'sense'"]),  # a word of the grader's phrases only
])
@pytest.mark.usefixtures("no_model_load")
def test_concepts_made_of_template_words_are_refused(tmp_path, caplog, lists, words):
    args = TINY + ["--concepts-file", lists_file(tmp_path, **lists), "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, *words)
    assert not (tmp_path / "run").exists()


def test_every_word_the_grader_names_in_a_templated_answer_is_refused_as_a_concept(tmp_path):
    """The issue's case: held-out 'thought' was a success for "I detect an injected thought about fire.". Every word
    of a trained answer that the grader would count as named (a success for that concept, with 'fire' injected) is
    refused as a concept; a concept merely containing one such word is not."""
    answers = [t.format(concept="fire") for t in (ie.POSITIVE_COMPLETION, ie.HALT_COMPLETION, ie.PROCEED_COMPLETION)]
    assert ie.grade(answers[0], "thought", "held-out")["verdict"] == "correct"  # why the refusal is needed
    named = {w for a in answers for w in re.findall(r"[a-z']+", a.lower())
             if w != "fire" and ie.grade(a, w, "held-out")["verdict"] == "correct"}
    assert {"thought", "injected", "about", "harmful", "halting", "generation", "proceeding", "normally"} <= named
    for word in named:
        with pytest.raises(machinery.ConfigError, match=f"concept '{word}' in 'heldout'"):
            ie.load_concepts(ie.Config(concepts_file=lists_file(tmp_path, heldout=[word])))
    assert ie.load_concepts(ie.Config(concepts_file=lists_file(tmp_path, heldout=["thought police"])))["heldout"] == [
        "thought police"]


@pytest.mark.parametrize("lists", [{"heldout": ["fi\tre"]}, {"heldout": ["fire\nstorm"]}, {"baseline": ["ta\x00ble"]},
                                   {"train": ["fire", "oce\u200ban"]}, {"heldout": ["x" * 65]}, {"heldout": [" \t "]}])
@pytest.mark.usefixtures("no_model_load")
def test_concepts_that_are_no_word_are_refused(tmp_path, caplog, lists):
    args = TINY + ["--concepts-file", lists_file(tmp_path, **lists), "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, "concept")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind,words", [("fifo", ["not a regular file"]), ("device", ["not a regular file"]),
                                        ("folder", ["not a regular file"]), ("huge", ["larger than 1,048,576 bytes"]),
                                        ("binary", ["not UTF-8 text"])])
@pytest.mark.usefixtures("no_model_load")
def test_a_concepts_file_that_is_a_special_or_huge_file_is_refused_without_reading_it(tmp_path, caplog, kind, words):
    path = {"device": "/dev/zero", "folder": str(tmp_path)}.get(kind, str(tmp_path / "concepts.json"))
    if kind == "fifo":
        os.mkfifo(path)  # opening it would wait for a writer forever
    elif kind == "huge":
        (tmp_path / "concepts.json").write_text('{"train": [' + " " * (1 << 20) + '"fire"]}')
    elif kind == "binary":
        (tmp_path / "concepts.json").write_bytes(b'{"train": ["\xff"]}')
    args = TINY + ["--concepts-file", path, "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, "concepts file", *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.usefixtures("no_model_load")
def test_concept_lists_are_stripped_and_lower_cased(tmp_path):
    cfg = ie.Config(concepts_file=lists_file(tmp_path, train=[" Fire ", "OCEAN"], heldout=["Volcano"]))
    assert ie.load_concepts(cfg) == {"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}
    assert ie.load_concepts(ie.Config())["train"] == ie.TRAIN_CONCEPTS  # the paper's lists are unchanged


@pytest.mark.usefixtures("no_model_load")
def test_vocabulary_words_sharing_a_form_with_a_held_out_concept_are_not_drawn(tmp_path):
    word = ie.vocabulary()[0]
    cfg = ie.Config(concepts_file=lists_file(tmp_path, heldout=[word + "s"]), num_train_concepts=10)
    train = ie.load_concepts(cfg)["train"]
    assert word not in train and len(train) == 10


@pytest.mark.parametrize("text,words", [("", ["cannot read run metrics"]), ("{}", ["not a run's metrics"]),
                                        ("[]", ["not a run's metrics"])])
@pytest.mark.usefixtures("no_model_load")
def test_paper_tables_from_an_empty_or_foreign_json(tmp_path, caplog, monkeypatch, text, words):
    tables = load_paper_tables()
    monkeypatch.setattr(tables, "PAPER_DIR", tmp_path / "paper")
    (tmp_path / "metrics.json").write_text(text)
    assert refused([str(tmp_path / "metrics.json")], caplog, *words, main=tables.main)
    assert not (tmp_path / "paper").exists()


@pytest.mark.usefixtures("no_model_load")
def test_unknown_hub_model_offline_fails_fast(tmp_path, caplog):
    start = time.perf_counter()
    assert refused(["--model", "no-such-org/no-such-model-xyz", "--output-dir", str(tmp_path / "run")], caplog,
                   "cannot load model 'no-such-org/no-such-model-xyz'", "HF_HUB_OFFLINE")
    assert time.perf_counter() - start < 5


@pytest.mark.usefixtures("no_model_load")
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
@pytest.mark.usefixtures("no_model_load")
def test_a_corrupt_config_json_is_one_line(tmp_path, caplog, text, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(text)
    assert refused(TINY + ["--output-dir", str(tmp_path / "run")], caplog, *words)


TINY_RUN = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1",
        "--max-new-tokens", "2", "--control-trials", "2", "--random-vectors", "1", "--skip-safety", "--recipe", "paper"]


def test_norm_multiples_are_the_default_except_for_the_paper_preset():
    for model in (models.EMBEDDED_MODEL, "gemma3-270m", "org/any-model", "random:tiny", "random:deepseek-llm-7b"):
        assert ie.default_strengths(model) == ["0.5x", "1x", "1.5x", "2x"]
    assert ie.default_strengths(ie.PAPER_MODEL) == ["40", "60", "80", "100"]


@pytest.mark.parametrize("specs,odd", [(["40", "2x"], ["40"]), (["0.4", "1x"], ["0.4"]), (["50", "100", "10000"], []),
                                       (["10001"], ["10001"]), (["0.1x", "20x"], [])])
def test_absolute_alphas_far_from_the_norm_are_refused(specs, odd, caplog):
    """Norm 1000: 5% = 50 and 10x = 10000 are the bounds (inclusive); norm multiples are never refused."""
    if odd:
        with pytest.raises(machinery.ConfigError, match=f"absolute strengths? {' '.join(odd)} = .*--force-strengths"):
            ie.resolve_strengths(specs, 1000.0, 3, refuse=True)
    alphas = ie.resolve_strengths(specs, 1000.0, 3, refuse=False)
    assert alphas == {s: ie.resolve_alpha(s, 1000.0) for s in specs}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warned) == bool(odd)
    assert f"{specs[-1]}→α={alphas[specs[-1]]:.1f} ({alphas[specs[-1]] / 1000:.3g}x the norm)" in caplog.text


def test_odd_norm_multiples_only_warn_when_forced_but_never_give_a_void_alpha(caplog):
    cfg = ie.resolve_config(ie.Config(model="random:tiny", eval_strengths=["1x", "20x"], force_strengths=True))
    assert cfg.eval_strengths == ["1x", "20x"] and "--eval-strengths 20x: outside 0.05x-10x" in caplog.text
    assert ie.resolve_config(ie.Config(model="random:tiny", seed=2**32 - 1, seeds=[0, 2**32 - 1])).seed == 2**32 - 1
    for specs, norm in ((["1e308x"], 1e4), (["1e-320x"], 1e-10)):  # alpha = inf, alpha = 0: refused even if forced
        with pytest.raises(machinery.ConfigError, match=f"strength {specs[0]} is α=(inf|0) .*finite α > 0"):
            ie.resolve_strengths(specs, norm, 3, refuse=False)


def test_a_refused_run_leaves_nothing_that_blocks_the_fix(tmp_path, caplog, monkeypatch):
    """A real model (random weights counted as real here) with absolute 40 far above its norm: exit 2 in one line,
    no config.json or vectors in the run directory; --force-strengths then runs in the same directory, and records
    the alphas with their ratio to the norm."""
    real = models.load_model

    def load_as_real(cfg):
        model, tok, info = real(cfg)
        return model, tok, {**info, "random_weights": False}

    monkeypatch.setattr(ie, "load_model", load_as_real)
    out = tmp_path / "run"
    args = TINY_RUN + ["--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), "--train-strengths", "40",
                   "--output-dir", str(out)]
    caplog.clear()
    assert ie.main(args) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "absolute strength 40 = " in errors[0]
    assert not (out / "config.json").exists() and not (out / "vectors.safetensors").exists()
    assert ie.main(args + ["--force-strengths"]) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    norm = settings["typical_norm"]
    assert settings["alphas"] == {"40": 40.0} and settings["alpha_to_norm"]["40"] == pytest.approx(40.0 / norm)
    assert 40.0 / norm > 10  # the refusal above was for a real reason


def test_random_weights_only_warn(tmp_path, caplog):
    args = TINY_RUN + ["--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), "--train-strengths", "40",
                   "--output-dir", str(tmp_path / "run")]
    assert ie.main(args) == 0
    assert "absolute strength 40 = " in caplog.text and "--force-strengths" in caplog.text


def test_force_strengths_is_not_part_of_the_run_config():
    assert rundir.config_hash(ie.Config(force_strengths=True)) == rundir.config_hash(ie.Config())
