"""Strength units that carry across models: norm multiples by default, odd absolute alphas refused unless forced,
the resolved alphas and their ratio to the norm logged and recorded."""
import json
import logging

import pytest

import introspection_experiment as ie
from conftest import SMALL_CONCEPTS, concepts_file

TINY = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1",
        "--max-new-tokens", "2", "--control-trials", "2", "--random-vectors", "1", "--skip-safety", "--recipe", "paper"]


def test_norm_multiples_are_the_default_except_for_the_paper_preset():
    for model in (ie.EMBEDDED_MODEL, "gemma3-270m", "org/any-model", "random:tiny", "random:deepseek-llm-7b"):
        assert ie.default_strengths(model) == ["0.5x", "1x", "1.5x", "2x"]
    assert ie.default_strengths(ie.PAPER_MODEL) == ["40", "60", "80", "100"]


@pytest.mark.parametrize("specs,odd", [(["40", "2x"], ["40"]), (["0.4", "1x"], ["0.4"]), (["50", "100", "10000"], []),
                                       (["10001"], ["10001"]), (["0.1x", "20x"], [])])
def test_absolute_alphas_far_from_the_norm_are_refused(specs, odd, caplog):
    """Norm 1000: 5% = 50 and 10x = 10000 are the bounds (inclusive); norm multiples are never refused."""
    if odd:
        with pytest.raises(ie.ConfigError, match=f"absolute strengths? {' '.join(odd)} = .*--force-strengths"):
            ie.resolve_strengths(specs, 1000.0, 3, refuse=True)
    alphas = ie.resolve_strengths(specs, 1000.0, 3, refuse=False)
    assert alphas == {s: ie.resolve_alpha(s, 1000.0) for s in specs}
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert bool(warned) == bool(odd)
    assert f"{specs[-1]}→α={alphas[specs[-1]]:.1f} ({alphas[specs[-1]] / 1000:.3g}x the norm)" in caplog.text


def test_a_refused_run_leaves_nothing_that_blocks_the_fix(tmp_path, caplog, monkeypatch):
    """A real model (random weights counted as real here) with absolute 40 far above its norm: exit 2 in one line,
    no config.json or vectors in the run directory; --force-strengths then runs in the same directory, and records
    the alphas with their ratio to the norm."""
    real = ie.load_model

    def load_as_real(cfg):
        model, tok, info = real(cfg)
        return model, tok, {**info, "random_weights": False}

    monkeypatch.setattr(ie, "load_model", load_as_real)
    out = tmp_path / "run"
    args = TINY + ["--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), "--train-strengths", "40",
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
    args = TINY + ["--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), "--train-strengths", "40",
                   "--output-dir", str(tmp_path / "run")]
    assert ie.main(args) == 0
    assert "absolute strength 40 = " in caplog.text and "--force-strengths" in caplog.text


def test_force_strengths_is_not_part_of_the_run_config():
    assert ie.config_hash(ie.Config(force_strengths=True)) == ie.config_hash(ie.Config())
