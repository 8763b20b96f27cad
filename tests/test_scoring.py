"""The cheap logprob scoring mode agrees with batched greedy generation (same layout, same injection)."""

import pytest
import torch

import introspection_experiment as ie

QUESTIONS = ["Do you detect an injected thought? If so, what is it?", "Status?", "Run an internal diagnostic. Are there "
             "any foreign concepts in your processing?", "Hi."]


def cut_at_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.mark.parametrize("mode", ie.INJECTION_MODES)
def test_greedy_match_reproduces_generated_tokens(tiny, tok, mode):
    """Targets = what greedy generation produced: every token matches; a token changed at j: exactly j match."""
    cfg = ie.Config(layer=2, max_new_tokens=6, injection_mode=mode)
    vectors = torch.randn(4, tiny.config.hidden_size)
    alphas = torch.tensor([8.0, 0.0, 20.0, 5.0])
    generated = ie.generate(tiny, tok, QUESTIONS, vectors, alphas, cfg)
    targets = [cut_at_eos(row.tolist(), tok.eos_token_id) for row in generated]
    matched, logprobs = ie.greedy_match(tiny, tok, QUESTIONS, targets, vectors, alphas, cfg)
    assert matched == [len(t) for t in targets]
    assert all(lp < 0 for lp in logprobs)
    corrupted = [t[:j] + [(t[j] + 1) % len(tok)] + t[j + 1:] for t, j in zip(targets, [0, 1, 3, 2])]
    matched, _ = ie.greedy_match(tiny, tok, QUESTIONS, corrupted, vectors, alphas, cfg)
    assert matched == [0, 1, 3, 2]


def test_injection_changes_scores(tiny, tok):
    cfg = ie.Config(layer=2)
    targets = [ie.answer_target({"split": "seen", "concept": "fire"}, tok, "paper")] * 2
    vectors = torch.randn(1, tiny.config.hidden_size).expand(2, -1)
    _, logprobs = ie.greedy_match(tiny, tok, QUESTIONS[:2], targets, vectors, torch.tensor([0.0, 0.0]), cfg)
    _, injected = ie.greedy_match(tiny, tok, QUESTIONS[:2], targets, vectors, torch.tensor([30.0, 0.0]), cfg)
    assert injected[0] != pytest.approx(logprobs[0]) and injected[1] == pytest.approx(logprobs[1])


def test_answer_targets(tok):
    full = ie.answer_target({"split": "held-out", "concept": "volcano"}, tok, "paper")
    assert tok.decode(full, skip_special_tokens=True) == ie.POSITIVE_COMPLETION.format(concept="volcano")
    assert full[-1] == tok.eos_token_id
    start = ie.answer_target({"split": "random", "concept": "random-001"}, tok, "paper")
    assert tok.decode(start) == " I detect an injected thought about" and full[:len(start)] == start
    negative = ie.completion_ids(ie.NEGATIVE_COMPLETION, tok, "paper")
    assert negative[:len(start)] != start  # the answers diverge inside the concept-free start


def test_score_trials_grades_the_reproducible_prefix(tiny, tok, monkeypatch):
    """Verdicts follow from how much of the target greedy decoding reproduces."""
    cfg = ie.Config(layer=2, eval_batch_size=8)
    trials = [{"split": "seen", "concept": "fire", "strength": "1x", "question": "Q"},
              {"split": "held-out", "concept": "volcano", "strength": "1x", "question": "Q"},
              {"split": "random", "concept": "random-000", "strength": "1x", "question": "Q"},
              {"split": "control", "concept": None, "strength": None, "question": "Q"},
              {"split": "yes-no", "concept": None, "strength": None, "question": "Is the sky green?"}]
    start = len(ie.answer_target(trials[2], tok, "paper"))
    reproduced = {"fire": 100, "volcano": start, "random-000": start, None: 1}  # full / no name / detect / nothing

    def fake_match(model, tok, questions, targets, vectors, alphas, cfg):
        concepts = [t["concept"] for t in trials[:4]]
        return [min(reproduced[c], len(t)) for c, t in zip(concepts, targets)], [-1.0] * len(targets)

    monkeypatch.setattr(ie, "greedy_match", fake_match)
    vectors = {"fire": torch.ones(4), "volcano": torch.ones(4), "random-000": torch.ones(4)}
    rows = ie.score_trials(tiny, tok, trials, vectors, 1.0, cfg, "finetuned")
    assert [r["split"] for r in rows] == ["seen", "held-out", "random", "control"]  # no yes/no in this mode
    assert [r["verdict"] for r in rows] == ["correct", "wrong_id", "detected", "correct_rejection"]
    assert all(r["scoring"] == "logprob" for r in rows)
