"""Stage 1, configuration: flags, bad input (one clear line, exit 2, before any work), the concept lists, and the
config resolved once before anything runs."""
import json
import subprocess
import sys

import pytest
import torch

import introspection_experiment as ie
from conftest import ROOT, concepts_file, run_main


def test_help_documents_every_config_field():
    out = subprocess.run([sys.executable, str(ROOT / "introspection_experiment.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for f in ie.dataclasses.fields(ie.Config):
        assert ie.flag(f) + " " in out or ie.flag(f) + "\n" in out


def test_default_model_falls_back_to_embedded_without_cuda(caplog):
    cfg = ie.resolve_config(ie.config_from_args([]))
    if torch.cuda.is_available():
        assert cfg.model == ie.PAPER_MODEL
    else:
        assert cfg.model == ie.EMBEDDED_MODEL and "No CUDA device" in caplog.text
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
    with pytest.raises(ie.ConfigError):
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
    assert ie.resolve_config(ie.Config(model=ie.EMBEDDED_MODEL)).layer == 20


def test_config_is_resolved_once_before_anything_runs(caplog):
    """resolve_config decides every model-dependent value (no weights loaded), is idempotent, and the hash covers the
    resolved config: leaving a default out or writing it in gives the same run."""
    given = ie.Config(model="random:tiny", eval_strengths=["1x"])
    resolved = ie.resolve_config(given)
    assert (resolved.layer, resolved.train_strengths, resolved.eval_strengths) == (2, ie.NORM_STRENGTHS, ["1x"])
    assert ie.resolve_config(resolved) == resolved
    explicit = ie.Config(model="random:tiny", layer=2, train_strengths=ie.NORM_STRENGTHS, eval_strengths=["1x"])
    assert ie.config_hash(ie.resolve_config(explicit)) == ie.config_hash(resolved) != ie.config_hash(given)
    assert ie.resolve_config(ie.Config(model=ie.EMBEDDED_MODEL)).train_strengths == ie.NORM_STRENGTHS


def test_run_writes_the_resolved_config(tmp_path, caplog):
    """config.json holds what ran (layer and strengths filled in), checked before the model is loaded: a bad layer
    fails with nothing written but the folder."""
    code, text = run_main(["--model", "random:tiny", "--layer", "9", "--output-dir", str(tmp_path / "bad")], caplog)
    assert code == 2 and "out of range" in text and not (tmp_path / "bad").exists()
