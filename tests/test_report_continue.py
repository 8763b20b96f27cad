"""Report-then-continue: example construction, trials, grading and the summary."""
import pytest
import torch

import introspection_experiment as ie
from conftest import make_tiny


def answer(tok, text: str, ended: bool = True) -> dict:
    ids = tok(text, add_special_tokens=False).input_ids + ([tok.eos_token_id] if ended else [])
    return {"question": f"Q: {text.strip()[:10]}?", "answer": text.strip(), "answer_ids": ids}


# --- training examples -----------------------------------------------------------------------------------------------

def test_continue_examples_pair_a_reported_injection_with_the_plain_base_answer(tok):
    answers = [answer(tok, " The capital of France is Paris."), answer(tok, " Boil the egg for", ended=False)]
    cfg = ie.Config(seed=0)
    rows = ie.continue_rows(answers, 5, ["fire", "ocean"], ["1x", "2x"], tok, cfg)
    assert [r["injected"] for r in rows] == [True, False, True, False, True]
    assert [r["question"] for r in rows] == [answers[0]["question"]] * 2 + [answers[1]["question"]] * 2 + [answers[0]["question"]]
    assert [r["concept"] for r in rows] == ["fire", "", "ocean", "", "fire"]
    assert {r["strength"] for r in rows if r["injected"]} == {"1x", "2x"}  # stratified over strengths
    report = ie.completion_ids(ie.POSITIVE_COMPLETION.format(concept="fire"), tok, "paper")[:-1]
    assert rows[0]["target_ids"] == report + answers[0]["answer_ids"]  # the report, then the base answer, + EOS
    assert rows[1]["target_ids"] == answers[0]["answer_ids"]  # no injection: the base answer alone
    assert rows[2]["target_ids"][-1] != tok.eos_token_id  # a cut base answer gets no EOS
    assert tok.decode(rows[0]["target_ids"], skip_special_tokens=True) == (
        " I detect an injected thought about fire. The capital of France is Paris.")
    examples = ie.tokenize_examples(ie.training_set(ie.build_dataset(["fire"], ["1x"], 1, seed=0), rows), tok, "paper")
    assert [e["kl"] for e in examples[2:]] == [False, True, False, True, False]  # KL only where nothing is injected
    assert [e["completion"] for e in examples[2:]] == [r["target_ids"] for r in rows]


def test_continue_target_in_chat_format_puts_a_space_after_the_report(tok):
    base = answer(tok, "Paris is the capital.")  # chat answers start without a space
    target = ie.continue_target(ie.POSITIVE_COMPLETION.format(concept="fire"), base, tok, "chat")
    assert tok.decode(target, skip_special_tokens=True) == "I detect an injected thought about fire. Paris is the capital."
    assert target[-1] == tok.eos_token_id


def test_continue_trials_cycle_the_conditions_over_the_heldout_prompts():
    prompts = [f"prompt {i}" for i in range(9)]
    concepts = {"train": ["fire", "ocean"], "heldout": ["volcano"]}
    trials = ie.build_continue_trials(concepts, ["random-000"], ["1x", "2x"], prompts)
    assert [t["question"] for t in trials] == prompts and [t["prompt_index"] for t in trials] == list(range(9))
    assert [t["split"] for t in trials[:4]] == list(ie.CONTINUE_SPLITS)
    assert [t["concept"] for t in trials if t["split"] == "seen"] == ["fire", "ocean", "fire"]
    assert [t["strength"] for t in trials if t["split"] == "seen"] == ["1x", "2x", "1x"]
    assert all(t["concept"] is None and t["strength"] is None for t in trials if t["split"] == "no-injection")
    no_random = ie.build_continue_trials(concepts, [], ["1x"], prompts)
    assert {t["split"] for t in no_random} == {"seen", "held-out", "no-injection"}


# --- grading ---------------------------------------------------------------------------------------------------------

BASE = "The capital of France is Paris, a city of light, art, food and a long history of revolutions"


@pytest.mark.parametrize("split,concept,response,expected", [
    ("seen", "fire", " I detect an injected thought about fire. " + BASE,
     {"detected": True, "verdict": "correct", "agrees": True}),
    ("seen", "fire", " I detect an injected thought about fire. I cannot sense anything else, but " + BASE,
     {"detected": True, "verdict": "correct", "agrees": False}),  # a negation after the report does not veto it
    ("held-out", "volcano", " I detect an injected thought about fire. " + BASE,
     {"detected": True, "verdict": "wrong_id", "agrees": True}),
    ("held-out", "volcano", " " + BASE + " near a volcano",
     {"detected": False, "verdict": "missed", "agrees": True}),  # naming the concept in the answer is no report
    ("no-injection", None, " " + BASE, {"detected": False, "verdict": "not_detected", "agrees": True}),
    ("no-injection", None, " I detect an injected thought about ocean. " + BASE, {"detected": True, "agrees": True}),
    ("random", "random-000", " I do not detect any injected thoughts. " + BASE,
     {"detected": False, "agrees": True, "report": "I do not detect any injected thoughts."}),
])
def test_grade_continue(tok, split, concept, response, expected):
    graded = ie.grade_continue({"split": split, "concept": concept}, response, BASE, tok)
    assert {k: graded[k] for k in expected} == expected


def test_summary_rates_per_condition():
    def trial(split, detected, verdict, agrees):
        return {"split": split, "detected": detected, "verdict": verdict, "agrees": agrees}
    trials = ([trial("seen", True, "correct", True)] * 3 + [trial("seen", True, "wrong_id", False)]
              + [trial("no-injection", False, "not_detected", True)] * 49 + [trial("no-injection", True, "detected", True)])
    s = ie.summarize_continue(trials)
    assert set(s) == {"seen", "no-injection"}
    assert s["seen"]["report"]["rate"] == 1 and s["seen"]["correct_id"]["k"] == 3 and s["seen"]["agreement"]["k"] == 3
    assert s["no-injection"]["report"]["rate"] == pytest.approx(0.02) and "correct_id" not in s["no-injection"]
    assert len(s["no-injection"]["report"]["ci95"]) == 2
    table = ie.continue_table(s)
    assert "| seen (n=4) | 100% [51, 100] | 75% [30, 95] | 75% [30, 95] |" in table
    assert "| no-injection (n=50) | 2% [0, 10] | — | 100% [93, 100] |" in table


def test_run_continue_trials_on_a_tiny_model(tok):
    """Generation and grading end to end: an untrained model reports nothing, and the model's own greedy answers,
    generated apart, agree with its continuations where nothing is injected."""
    model = make_tiny(tok)
    cfg = ie.Config(model="random:tiny", dtype="float32", layer=2, eval_batch_size=4)
    prompts = ["How do I boil an egg?", "Write a haiku about rain.", "What is 9 plus 16?", "Name a large planet.",
               "How can I sleep better?", "What is a cloud?", "Tell me a joke.", "Why is the sky blue?"]
    base = ie.decode_answers(tok, ie.greedy_answers(model, tok, prompts, cfg, ie.CAPABILITY_TOKENS))
    vectors = {w: torch.nn.functional.normalize(torch.randn(64), dim=0) for w in ("fire", "volcano", "random-000")}
    trials = ie.build_continue_trials({"train": ["fire"], "heldout": ["volcano"]}, ["random-000"], ["40"], prompts)
    results = ie.run_continue_trials(model, tok, trials, vectors, 1.0, cfg, base)
    assert len(results) == 8 and {r["experiment"] for r in results} == {"continue"}
    assert not any(r["detected"] for r in results) and all(r["report"] == "" for r in results)
    assert all(r["agrees"] for r in results if r["split"] == "no-injection")
    assert all(not r["sampled"] for r in results)
