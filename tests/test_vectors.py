"""Stage 3, concept vectors: the vector token, random directions, load-or-extract."""
import pytest
import torch

import introspection_experiment as ie


def test_word_token_index_points_at_the_concept(tok):
    text = ie.format_prompt(ie.EXTRACTION_QUESTION.format(word="avalanche"), tok, "paper")
    index = ie.word_token_index(text, "avalanche", tok, "paper")
    ids = ie.encode(text, tok, "paper")
    assert tok.decode(ids[:index + 1]).endswith("avalanche") and not tok.decode(ids[:index]).endswith("avalanche")


def test_random_directions_unit_norm_and_independent_streams():
    evaluation = ie.random_directions(3, 16, seed=0)
    training = ie.random_directions(3, 16, seed=0, prefix="train-random")
    assert list(evaluation) == ["random-000", "random-001", "random-002"]
    for v in [*evaluation.values(), *training.values()]:
        assert abs(float(v.norm()) - 1) < 1e-5
    assert not torch.allclose(evaluation["random-000"], training["train-random-000"])
    assert torch.equal(evaluation["random-001"], ie.random_directions(3, 16, seed=0)["random-001"])


def test_load_or_extract_vectors_extracts_once(tiny, tok, tmp_path, monkeypatch):
    """The first call extracts unit-norm vectors and saves them (timed as its stage); the second loads the same ones
    without extracting."""
    concepts = {"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}
    cfg, timer, path = ie.Config(layer=2), ie.Timer(tmp_path / "timings.json"), tmp_path / "vectors.safetensors"
    vectors, meta = ie.load_or_extract_vectors(tiny, tok, concepts, cfg, path, timer, "concept_vectors")
    assert list(vectors) == ["fire", "ocean", "volcano"] and meta["layer"] == 2 and "concept_vectors" in timer.times
    assert all(abs(float(v.norm()) - 1) < 1e-4 for v in vectors.values())
    monkeypatch.setattr(ie, "extract_concept_vectors", lambda *a: pytest.fail("extracted again"))
    again, meta_again = ie.load_or_extract_vectors(tiny, tok, concepts, cfg, path, timer, "concept_vectors")
    assert meta_again == meta and all(torch.equal(again[w], vectors[w]) for w in vectors)
