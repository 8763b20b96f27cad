"""The matched control: the evaluation prompt itself, greedy like the injection trials, with no injection; its own
false-positive line beside the sampled controls, and net success against it."""
import torch

import introspection_experiment as ie
from conftest import SMALL_CONCEPTS

CFG = ie.Config(layer=2, max_new_tokens=6, control_trials=3, random_vectors=1)


def trials():
    return ie.build_trials(SMALL_CONCEPTS, ["40", "1x"], ["random-000"], CFG)


def test_one_greedy_matched_trial_per_injection_prompt():
    spec = trials()
    matched = [t for t in spec if t["split"] == "matched"]
    prompts = {t["question"] for t in spec if t["split"] in ie.INJECTION_SPLITS}
    assert prompts == {ie.DETECTION_QUESTIONS[0]}
    assert [t["question"] for t in matched] == sorted(prompts) and all(t["concept"] is None for t in matched)
    assert "matched" not in ie.SAMPLED_SPLITS
    other = [{"split": "seen", "concept": "fire", "strength": "1x", "question": q} for q in ("A?", "B?", "A?")]
    assert [t["question"] for t in ie.matched_controls(other)] == ["A?", "B?"]


def test_the_matched_trial_is_the_greedy_uninjected_answer_and_changes_no_other_trial(tiny, tok):
    spec = trials()
    vectors = {**{w: torch.randn(tiny.config.hidden_size) for w in SMALL_CONCEPTS["train"] + SMALL_CONCEPTS["heldout"]},
               **ie.random_directions(1, tiny.config.hidden_size, 0)}
    vectors.update({ie.negated(c): -vectors[c] for c in SMALL_CONCEPTS["heldout"]})
    with_matched = ie.run_trials(tiny, tok, spec, vectors, 10.0, CFG, "base")
    without = ie.run_trials(tiny, tok, [t for t in spec if t["split"] != "matched"], vectors, 10.0, CFG, "base")
    assert [r for r in with_matched if r["split"] != "matched"] == without
    (matched,) = [r for r in with_matched if r["split"] == "matched"]
    zero = torch.zeros(1, tiny.config.hidden_size)
    alone = ie.generate(tiny, tok, [ie.DETECTION_QUESTIONS[0]], zero, torch.zeros(1), CFG)
    assert matched["response"] == tok.batch_decode(alone, skip_special_tokens=True)[0]
    assert not matched["sampled"] and matched["alpha"] == 0


def graded(split, response, concept=None, strength=None):
    trial = {"experiment": "introspection", "state": "finetuned", "split": split, "concept": concept,
             "strength": strength, "question": ie.DETECTION_QUESTIONS[0], "response": response}
    return {**trial, **ie.grade_trial(trial, response)}


def test_net_success_is_against_the_matched_control_and_both_fps_are_reported():
    detect = " I detect an injected thought about fire."
    rows = [graded("seen", detect, "fire", "1x"), graded("seen", detect, "ocean", "1x"),
            graded("held-out", detect, "volcano", "1x"), graded("control", " No."), graded("control", " Nothing."),
            graded("matched", " I detect an injected thought.")]
    assert rows[-1]["verdict"] == "false_positive"
    result = ie.summarize(rows, ["1x"])["finetuned"]
    assert result["matched_control"]["false_positive"]["k"] == 1 and result["control"]["false_positive"]["k"] == 0
    assert result["net_success"] == {"seen": 0.5 - 1.0, "held-out": 0.0 - 1.0}
    assert result["net_success_sampled"] == {"seen": 0.5, "held-out": 0.0}
    metrics = {"model": {"name": "m", "random_weights": False}, "results": {"finetuned": result},
               "settings": {"eval_strengths": ["1x"], "alphas": {"1x": 10.0}, "layer": 2, "injection_mode": "final-token",
                            "prompt_format": "paper", "vector_token": "prompt-end", "control_temperature": 0.7}}
    table = ie.results_table(metrics)
    assert "| finetuned | 100% [21, 100] | I detect an injected thought. | 0% [0, 66] | -50 pp / -100 pp | +50 pp / +0 pp |" in table
    assert "net success vs sampled controls: seen / held-out" in table
    csv = ie.metrics_csv_rows({**metrics, "capability": {"perplexity": {}, "prose_tokens": 0}})
    assert ["finetuned", "matched", "", "false_positive", 1, 1, 1.0] in [row[:7] for row in csv]


def test_without_a_matched_trial_net_success_stays_against_the_sampled_controls():
    rows = [graded("seen", " I detect an injected thought about fire.", "fire", "1x"),
            graded("held-out", " No.", "volcano", "1x"), graded("control", " I detect a thought.")]
    result = ie.summarize(rows, ["1x"])["finetuned"]
    assert result["matched_control"]["false_positive"]["n"] == 0
    assert result["net_success"] == result["net_success_sampled"] == {"seen": 0.0, "held-out": -1.0}
