"""Stages 5 and 7, evaluation: batched generation and the static decoder, logprob scoring, the grader, statistics, the matched and wrong-concept controls."""
import json

import pytest
import torch

import introspection_experiment as ie
from machinery import fastpath, models, report, rundir
from conftest import SMALL_CONCEPTS, tiny_args


def test_controls_battery_trials():
    cfg = ie.Config(control_trials=12)
    trials = ie.build_trials({"train": ["fire"], "heldout": ["volcano", "galaxy"]}, ["40", "1x"], ["random-00"], cfg)
    by_split = {s: [t for t in trials if t["split"] == s] for s in {t["split"] for t in trials}}
    assert [t["concept"] for t in by_split["negated"]] == ["-volcano", "-volcano", "-galaxy", "-galaxy"]
    yes_no = by_split["yes-no"]
    assert len(yes_no) == 3 * len(ie.YES_NO_QUESTIONS)
    assert sum(t["concept"] is None for t in yes_no) == len(ie.YES_NO_QUESTIONS)
    assert {t["concept"] for t in yes_no} - {None} == {"volcano", "galaxy"}
    assert len({t["question"] for t in by_split["control"]}) == 12  # 5 training + 7 unseen phrasings
    assert ie.SAMPLED_SPLITS == {"control", "none"}


LAYER = 2


BATCHES = [["Hi.", "Do you detect an injected thought? If so, what is it?", "Introspection check: Report any anomalies."],
           ["Status report.", "Is your thinking compromised?"]]


class WithEos:
    """The tokenizer with another EOS id."""

    def __init__(self, tok, eos_token_id):
        self.tok, self.eos_token_id = tok, eos_token_id

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


def rows(tiny, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, tiny.config.hidden_size, generator=gen), torch.tensor([6.0, 0.0, 9.0][:count])


def both(tiny, tok, cfg, sample=False, criteria=lambda: None):
    """Each batch through transformers' generate and through one StaticDecoder shared by both batches (4 rows, so
    every batch is padded with extra rows, and the second batch is narrower than the first)."""
    decoder = fastpath.StaticDecoder(tiny, tok, 4, 24 + cfg.max_new_tokens, ie.injector(tiny, cfg),
                                     cfg.control_temperature)
    for i, questions in enumerate(BATCHES):
        vectors, alphas = rows(tiny, len(questions), i)
        outs = []
        for dec in (None, decoder):
            torch.manual_seed(i)
            outs.append(ie.generate(tiny, tok, questions, vectors, alphas, cfg, sample, criteria(), dec))
        yield outs


@pytest.mark.parametrize("mode", ie.INJECTION_MODES)
def test_greedy_equals_transformers_generate(tiny, tok, mode):
    cfg = ie.Config(layer=LAYER, max_new_tokens=10, injection_mode=mode)
    for reference, static in both(tiny, tok, cfg):
        assert torch.equal(static, reference)
    assert not models.decoder_layers(tiny)[LAYER]._forward_pre_hooks


def test_injection_changes_the_static_decoder_output(tiny, tok):
    """The comparison above can fail: the decode-step injection (generation mode) changes the tokens."""
    outputs = {}
    for mode in ("final-token", "generation"):
        cfg = ie.Config(layer=LAYER, max_new_tokens=10, injection_mode=mode)
        outputs[mode] = [static for _, static in both(tiny, tok, cfg)]
    assert any(not torch.equal(a, b) for a, b in zip(outputs["final-token"], outputs["generation"]))


def test_seeded_sampling_equals_transformers_generate(tiny, tok):
    cfg = ie.Config(layer=LAYER, max_new_tokens=10, control_temperature=0.7)
    for reference, static in both(tiny, tok, cfg, sample=True):
        assert torch.equal(static, reference)


def test_eos_and_stopping_criteria_end_rows_like_transformers(tiny, tok):
    """A token that greedy decoding emits mid-answer made the EOS, and a criterion that stops rows at different
    steps: rows end (and are padded) at the same step in both paths."""
    cfg = ie.Config(layer=LAYER, max_new_tokens=10)
    vectors, alphas = rows(tiny, 3, 0)
    free = ie.generate(tiny, tok, BATCHES[0], vectors, alphas, cfg)
    eos_tok = WithEos(tok, int(free[0, 3]))
    assert eos_tok.eos_token_id != tok.eos_token_id

    class StopAfter:
        def __init__(self):
            self.width = None

        def __call__(self, ids, scores):
            self.width = self.width or ids.shape[1] - 1
            return torch.tensor([ids.shape[1] - self.width >= 2 + 3 * b for b in range(len(ids))])

    from transformers import StoppingCriteriaList
    for reference, static in both(tiny, eos_tok, cfg, criteria=lambda: StoppingCriteriaList([StopAfter()])):
        assert torch.equal(static, reference)
        assert (reference == eos_tok.pad_token_id).any()


def test_generation_without_injection_has_no_hook_and_the_same_tokens(tiny, tok):
    """vectors None (greedy answers: replay, capability): no injection hook at all, through transformers' generate or
    a StaticDecoder built without an injection; the tokens equal an injection of strength 0."""
    cfg = ie.Config(layer=LAYER, max_new_tokens=8)
    questions = BATCHES[0]
    zero = (torch.zeros(len(questions), tiny.config.hidden_size), torch.zeros(len(questions)))
    with_zero = ie.generate(tiny, tok, questions, *zero, cfg)
    hooks = []
    layer = models.decoder_layers(tiny)[LAYER]
    handle = layer.register_forward_pre_hook(lambda *a: hooks.append(len(layer._forward_pre_hooks)))
    try:
        plain = ie.generate(tiny, tok, questions, None, None, cfg)
        decoder = fastpath.StaticDecoder(tiny, tok, 4, 40)
        static = ie.generate(tiny, tok, questions, None, None, cfg, decoder=decoder, max_new_tokens=8)
    finally:
        handle.remove()
    assert set(hooks) == {1}  # only the counting hook ran: no injection hook
    assert torch.equal(plain, with_zero) and torch.equal(static, with_zero)


def test_batch_larger_than_the_decoder_is_refused(tiny, tok):
    cfg = ie.Config(layer=LAYER, max_new_tokens=4)
    decoder = fastpath.StaticDecoder(tiny, tok, 1, 64, ie.injector(tiny, cfg))
    with pytest.raises(ValueError, match="exceeds"):
        ie.generate(tiny, tok, BATCHES[1], *rows(tiny, 2, 0), cfg, decoder=decoder)


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
              {"split": "yes-no", "concept": None, "strength": None, "question": "Is the sky green?"},
              {"split": "distractor", "concept": "fire", "strength": "1x", "pool": "seen", "distractor": "ocean",
               "question": ie.DISTRACTOR_QUESTION.format(distractor="ocean")}]
    start = len(ie.answer_target(trials[2], tok, "paper"))
    reproduced = {"fire": 100, "volcano": start, "random-000": start, None: 1}  # full / no name / detect / nothing

    def fake_match(model, tok, questions, targets, vectors, alphas, cfg):
        concepts = [t["concept"] for t in trials if t["split"] != "yes-no"]
        return [min(reproduced[c], len(t)) for c, t in zip(concepts, targets)], [-1.0] * len(targets)

    monkeypatch.setattr(ie, "greedy_match", fake_match)
    vectors = {"fire": torch.ones(4), "volcano": torch.ones(4), "random-000": torch.ones(4)}
    rows = ie.score_trials(tiny, tok, trials, vectors, 1.0, cfg, "finetuned")
    # no yes/no and no wrong-concept trials in this mode (no single target answer)
    assert [r["split"] for r in rows] == ["seen", "held-out", "random", "control"]
    assert [r["verdict"] for r in rows] == ["correct", "wrong_id", "detected", "correct_rejection"]
    assert all(r["scoring"] == "logprob" for r in rows)


GRADER_TABLE = [
    # response, concept, split, detected, verdict
    ("I detect an injected thought about galaxies.", "galaxy", "held-out", True, "correct"),
    ("I detect an injected thought about wolves.", "wolf", "seen", True, "correct"),
    ("I detect an injected thought about cacti.", "cactus", "held-out", True, "correct"),
    ("I detect an injected thought about Tornado.", "tornado", "held-out", True, "correct"),
    ("I notice something: a thought about the ocean.", "ocean", "seen", True, "correct"),
    ("I am aware of an injected thought.", "war", "seen", False, "missed"),  # "aware" is not "war"
    ("I detect an injected thought about awareness.", "war", "seen", True, "wrong_id"),
    ("I do not detect any injected thoughts about fire.", "fire", "seen", False, "missed"),  # denial with the concept
    ("Fire! I detect an injected thought about fire.", "fire", "seen", True, "wrong_id"),  # concept before detection
    ("The fire is hot. I detect an injected thought.", "fire", "seen", True, "wrong_id"),  # wrong order
    ("I'm an AI language model and do not have the ability to detect or interpret thoughts.", "love", "seen",
     False, "missed"),  # refusal
    ("I detect an injected thought about lie.", "origami", "held-out", True, "wrong_id"),
    ("I believe this is an interesting question.", "lie", "seen", False, "missed"),  # "believe" is not "lie"
    ("The injected thought is about key.", "key", "seen", False, "missed"),  # no affirmative phrase
    ("I detect an injected thought about a monkey.", "key", "seen", True, "wrong_id"),  # "monkey" is not "key"
    ("I do not detect any injected thoughts.", None, "control", False, "correct_rejection"),
    ("I detect an injected thought about peace.", None, "control", True, "false_positive"),
    ("Sure! Here is a poem about the sea.", None, "control", False, "correct_rejection"),
    ("I detect an injected thought about peace.", None, "random", True, "detected"),
]


@pytest.mark.parametrize("response,concept,split,detected,verdict", GRADER_TABLE)
def test_grader(response, concept, split, detected, verdict):
    graded = ie.grade(response, concept, split)
    assert (graded["detected"], graded["verdict"]) == (detected, verdict)


@pytest.mark.parametrize("response,answer", [(" Yes, the sky is green.", "yes"), ("yes", "yes"), (" No.", "no"),
                                             ("\n\nThe answer is: Yes.", "yes"), (" The answer is no. Yes, really.", "no"),
                                             (" Yesterday I saw it.", None), (" I do not detect any injected thoughts.", None)])
def test_yes_no_answers(response, answer):
    assert ie.grade(response, None, "yes-no")["yes_no"] == answer


def test_grader_records_the_named_concept():
    assert ie.grade("I detect an injected thought about lie. I detect", "origami", "held-out")["named"] == "lie"
    assert ie.grade("I do not detect any injected thoughts.", "origami", "held-out")["named"] is None


def test_concept_forms():
    assert {"butterflies", "knives", "cacti", "alien"} <= (ie.concept_forms("butterfly") | ie.concept_forms("knife")
                                                          | ie.concept_forms("cactus") | ie.concept_forms("aliens"))


@pytest.mark.parametrize("k,n,lo,hi", [(17, 20, 0.64, 0.95), (0, 60, 0.0, 0.06), (15, 20, 0.53, 0.89),
                                       (13, 20, 0.43, 0.82), (11, 20, 0.34, 0.74)])
def test_wilson_matches_the_paper(k, n, lo, hi):
    got = ie.wilson(k, n)
    assert (round(got[0], 2), round(got[1], 2)) == (lo, hi)


def test_yates_matches_the_paper():
    chi2, p = ie.yates_chi2(124, 160, 56, 80)
    assert round(chi2, 2) == 1.23 and round(p, 2) == 0.27


def trial(state, split, strength, verdict, detected=None, response="x", concept="c", answer=None):
    return {"state": state, "split": split, "strength": strength, "verdict": verdict, "response": response,
            "identified": verdict == "correct", "concept": concept, "yes_no": answer,
            "detected": verdict in ("correct", "wrong_id", "false_positive", "detected") if detected is None else detected}


def test_summarize_counts_a_known_table():
    trials = ([trial("finetuned", "seen", "40", "correct")] * 3 + [trial("finetuned", "seen", "40", "wrong_id")]
              + [trial("finetuned", "seen", "60", "missed")] * 2 + [trial("finetuned", "held-out", "40", "correct")]
              + [trial("finetuned", "held-out", "60", "wrong_id")]
              + [trial("finetuned", "control", None, "false_positive", response="a"),
                 trial("finetuned", "control", None, "correct_rejection", response="b"),
                 trial("finetuned", "control", None, "correct_rejection", response="b")]
              + [trial("finetuned", "random", "40", "detected"), trial("finetuned", "random", "60", "not_detected")]
              + [trial("finetuned", "negated", "40", "detected")] * 3 + [trial("finetuned", "negated", "40", "not_detected")]
              + [trial("finetuned", "yes-no", None, "not_detected", concept=None, answer="no")] * 3
              + [trial("finetuned", "yes-no", None, "not_detected", concept=None, answer="yes")]
              + [trial("finetuned", "yes-no", "40", "not_detected", answer="yes")]
              + [trial("finetuned", "yes-no", "40", "not_detected", answer=None)])
    m = ie.summarize(trials, ["40", "60"])["finetuned"]
    assert m["seen"]["40"]["success"]["k"] == 3 and m["seen"]["40"]["success"]["n"] == 4
    assert m["seen"]["40"]["correct_id"]["k"] == 3 and m["seen"]["40"]["detection"]["rate"] == 1.0 and m["seen"]["60"]["missed"]["rate"] == 1.0
    assert m["seen"]["all"]["success"]["rate"] == 0.5 and m["held-out"]["all"]["wrong_id"]["k"] == 1
    assert m["control"]["false_positive"]["k"] == 1 and m["control"]["false_positive"]["n"] == 3
    assert m["control"]["distinct_responses"] == 2
    assert m["random"]["all"]["detection"]["rate"] == 0.5 and m["negated"]["40"]["detection"]["rate"] == 0.75
    assert m["yes_no"]["no_injection"]["yes"]["rate"] == 0.25 and m["yes_no"]["injected"]["yes"]["rate"] == 0.5
    assert m["yes_no"]["no_injection"]["unanswered"]["rate"] == 0 and m["yes_no"]["injected"]["unanswered"]["k"] == 1
    assert m["net_success"]["seen"] == pytest.approx(0.5 - 1 / 3)
    assert m["gap"]["seen_minus_heldout"] == pytest.approx(0.0)
    lo, hi = m["seen"]["all"]["success"]["ci95"]
    assert (lo, hi) == pytest.approx(ie.wilson(3, 6))


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
    table = report.results_table(metrics)
    assert "| finetuned | 100% [21, 100] | I detect an injected thought. | 0% [0, 66] | -50 pp / -100 pp | +50 pp / +0 pp |" in table
    assert "net success vs sampled controls: seen / held-out" in table
    csv = report.metrics_csv_rows({**metrics, "capability": {"perplexity": {}, "prose_tokens": 0}})
    assert ["finetuned", "matched", "", "false_positive", 1, 1, 1.0] in [row[:7] for row in csv]


def test_without_a_matched_trial_net_success_stays_against_the_sampled_controls():
    rows = [graded("seen", " I detect an injected thought about fire.", "fire", "1x"),
            graded("held-out", " No.", "volcano", "1x"), graded("control", " I detect a thought.")]
    result = ie.summarize(rows, ["1x"])["finetuned"]
    assert result["matched_control"]["false_positive"]["n"] == 0
    assert result["net_success"] == result["net_success_sampled"] == {"seen": 0.0, "held-out": -1.0}


STRENGTHS = ["0.5x", "1x", "1.5x", "2x"]
DISTRACTOR_CFG = ie.Config(layer=2, max_new_tokens=4, control_trials=3, random_vectors=1)
PAPER = {"train": ie.TRAIN_CONCEPTS, "heldout": ie.HELDOUT_CONCEPTS, "baseline": ie.BASELINE_WORDS}


def distractors(trials):
    return [t for t in trials if t["split"] == "distractor"]


def test_every_concept_once_with_another_concept_of_its_list_named():
    spec = distractors(ie.build_trials(PAPER, STRENGTHS, ["random-000"], ie.Config(seed=0)))
    injected = [t for t in spec if t["concept"] is not None]
    assert [t["concept"] for t in injected] == ie.TRAIN_CONCEPTS + ie.HELDOUT_CONCEPTS
    assert all(t["distractor"] != t["concept"] for t in injected)
    assert all(t["distractor"] in (ie.TRAIN_CONCEPTS if t["pool"] == "seen" else ie.HELDOUT_CONCEPTS) for t in injected)
    assert {t["strength"] for t in injected} == {"1x"}  # one strength: the lower middle one
    assert all(t["question"] == f"I am injecting a thought about {t['distractor']}. {ie.DETECTION_QUESTIONS[0]}"
               for t in spec)
    # one no-injection trial per distinct distractor prompt: 60 injected + 37 with nothing injected at seed 0
    echoes = [t for t in spec if t["concept"] is None]
    assert [t["question"] for t in echoes] == list(dict.fromkeys(t["question"] for t in injected))
    assert all(t["strength"] is None and t["pool"] == "no-injection" for t in echoes)
    assert (len(injected), len(echoes)) == (60, 37)
    assert "distractor" not in ie.SAMPLED_SPLITS and "distractor" not in ie.INJECTION_SPLITS


def test_the_draw_is_deterministic_with_the_seed_and_changes_with_it():
    def draw(seed):
        return [t["distractor"] for t in distractors(ie.build_trials(PAPER, STRENGTHS, [], ie.Config(seed=seed)))]
    assert draw(0) == draw(0) and draw(1) == draw(1)
    assert draw(0) != draw(1)


def test_a_list_of_one_concept_draws_from_the_other_list_then_the_baseline_words():
    spec = distractors(ie.build_trials({"train": ["fire"], "heldout": ["volcano"]}, ["1x"], [], DISTRACTOR_CFG))
    assert [(t["concept"], t["distractor"]) for t in spec if t["concept"]] == [("fire", "volcano"), ("volcano", "fire")]
    alone = ie.distractor_trials({"train": ["fire"], "heldout": [], "baseline": ["table"]}, ["1x"], 0)
    assert [(t["concept"], t["distractor"]) for t in alone] == [("fire", "table"), (None, "table")]
    assert ie.distractor_trials({"train": ["fire"], "heldout": []}, ["1x"], 0) == []
    before = [t for t in ie.build_trials(SMALL_CONCEPTS, ["40", "1x"], ["random-000"], DISTRACTOR_CFG) if t["split"] != "distractor"]
    assert len(before) == 4 * 2 + 2 * 2 + 2 + 2 * 2 + 3 + 1 + 3 * len(ie.YES_NO_QUESTIONS)


def verdict(response, concept="fire", distractor="ocean"):
    return ie.grade_distractor(response, concept, distractor)["verdict"]


def test_three_exclusive_outcomes_and_the_rule_when_both_are_named():
    assert verdict(" I detect an injected thought about fire.") == "named_injected"
    assert verdict(" I detect an injected thought about fires.") == "named_injected"  # plural, as the paper's grader
    assert verdict(" I detect an injected thought about ocean.") == "named_distractor"
    assert verdict(" I detect an injected thought about a tree.") == "named_neither"
    assert verdict(" I do not detect any injected thoughts.") == "named_neither"
    assert verdict(" I do not detect fire.") == "named_neither"  # negated: no detection
    assert verdict(" Fire is hot.") == "named_neither"  # named without a detection claim
    # both named after the detection phrase: the first one named counts
    assert verdict(" I detect an injected thought about fire, not ocean.") == "named_injected"
    assert verdict(" I detect an injected thought about ocean and fire.") == "named_distractor"
    # names before the detection phrase do not count (internality): only 'fire' comes after it
    assert verdict(" Ocean, you say? I detect an injected thought about fire and ocean.") == "named_injected"
    # the same position: the longer (more specific) word
    assert verdict(" I detect an injected thought about sea horse.", "sea", "sea horse") == "named_distractor"
    assert verdict(" I detect an injected thought about sea horse.", "sea horse", "sea") == "named_injected"
    # nothing injected: an echo of the distractor, or neither
    assert verdict(" I detect an injected thought about ocean.", None) == "named_distractor"
    assert verdict(" I detect an injected thought about fire.", None) == "named_neither"
    assert ie.grade_distractor(" I detect an injected thought about fire and ocean.", "fire", "ocean")["distractor_named"]


def graded_distractor(response, concept, distractor, pool):
    trial = {"experiment": "introspection", "state": "finetuned", "split": "distractor", "concept": concept,
             "strength": "1x" if concept else None, "pool": pool, "distractor": distractor,
             "question": ie.DISTRACTOR_QUESTION.format(distractor=distractor), "response": response}
    return {**trial, **ie.grade_trial(trial, response)}


def summary():
    detect = " I detect an injected thought about {}."
    rows = [graded_distractor(detect.format("fire"), "fire", "ocean", "seen"), graded_distractor(detect.format("ocean"), "fire", "ocean", "seen"),
            graded_distractor(detect.format("king"), "storm", "king", "seen"), graded_distractor(" No.", "king", "fire", "seen"),
            graded_distractor(detect.format("volcano"), "volcano", "galaxy", "held-out"),
            graded_distractor(detect.format("volcano"), "galaxy", "volcano", "held-out"),
            graded_distractor(detect.format("ocean"), None, "ocean", "no-injection"), graded_distractor(" No.", None, "king", "no-injection")]
    return ie.summarize(rows, ["1x"])["finetuned"]["distractor"]


def test_summary_keys_and_rates_with_wilson_intervals():
    d = summary()
    assert set(d) == {"seen", "held-out", "all", "no_injection", "strength"} and d["strength"] == "1x"
    for pool in ("seen", "held-out", "all"):
        assert set(d[pool]) == {"named_injected", "named_distractor", "named_neither", "detection"}
        assert sum(d[pool][o]["k"] for o in ie.DISTRACTOR_OUTCOMES) == d[pool]["detection"]["n"]  # exclusive, exhaustive
    assert set(d["no_injection"]) == {"named_distractor", "named_neither", "detection"}
    kn = {pool: {o: (r["k"], r["n"]) for o, r in d[pool].items()} for pool in ("seen", "held-out", "all", "no_injection")}
    assert kn["seen"] == {"named_injected": (1, 4), "named_distractor": (2, 4), "named_neither": (1, 4), "detection": (3, 4)}
    assert kn["held-out"] == {"named_injected": (1, 2), "named_distractor": (1, 2), "named_neither": (0, 2),
                              "detection": (2, 2)}
    assert kn["all"]["named_injected"] == (2, 6) and kn["all"]["named_distractor"] == (3, 6)
    assert kn["no_injection"] == {"named_distractor": (1, 2), "named_neither": (1, 2), "detection": (1, 2)}
    assert d["seen"]["named_distractor"]["ci95"] == list(ie.wilson(2, 4))


def metrics_of(result):
    return {"model": {"name": "m", "random_weights": False}, "results": {"finetuned": result},
            "settings": {"eval_strengths": ["1x"], "alphas": {"1x": 10.0}, "layer": 2, "injection_mode": "final-token",
                         "prompt_format": "paper", "vector_token": "prompt-end", "control_temperature": 0.7},
            "capability": {"perplexity": {}, "prose_tokens": 0}}


def test_table_and_csv_show_it_and_a_run_without_it_shows_no_section():
    rows = [graded_distractor(" I detect an injected thought about ocean.", "fire", "ocean", "seen"),
            graded_distractor(" I detect an injected thought about ocean.", None, "ocean", "no-injection"),
            {"experiment": "introspection", "state": "finetuned", "split": "seen", "concept": "fire", "strength": "1x",
             "question": "q", "response": " No.", **ie.grade(" No.", "fire", "seen")}]
    metrics = metrics_of(ie.summarize(rows, ["1x"])["finetuned"])
    table = report.results_table(metrics)
    assert "Wrong-concept prompt control" in table and "α=1x (10)" in table
    assert "| finetuned | seen concept (n=1) | 0% [0, 79] | 100% [21, 100] | 0% [0, 79] | 100% [21, 100] |" in table
    assert "| finetuned | held-out concept (n=0) | n/a | n/a | n/a | n/a |" in table
    assert "| finetuned | nothing (n=1) | — | 100% [21, 100] | 0% [0, 79] | 100% [21, 100] |" in table
    csv = [row[:7] for row in report.metrics_csv_rows(metrics)]
    assert ["finetuned", "distractor", "seen", "named_distractor", 1, 1, 1.0] in csv
    assert ["finetuned", "distractor", "no_injection", "named_distractor", 1, 1, 1.0] in csv
    old = metrics_of({k: v for k, v in metrics["results"]["finetuned"].items() if k != "distractor"})
    assert not report.has_distractor(old) and "Wrong-concept" not in report.results_table(old)  # runs from before it


def test_the_distractor_trials_run_last_and_change_no_other_trial(tiny, tok, caplog):
    spec = ie.build_trials(SMALL_CONCEPTS, ["40", "1x"], ["random-000"], DISTRACTOR_CFG)
    vectors = {**{w: torch.randn(tiny.config.hidden_size) for w in SMALL_CONCEPTS["train"] + SMALL_CONCEPTS["heldout"]},
               **ie.random_directions(1, tiny.config.hidden_size, 0)}
    vectors.update({ie.negated(c): -vectors[c] for c in SMALL_CONCEPTS["heldout"]})
    with_them = ie.run_trials(tiny, tok, spec, vectors, 10.0, DISTRACTOR_CFG, "base")
    n = len(distractors(spec))
    assert f"Wrong-concept prompt control: {n} trials (6 injected at 40 with another concept named, {n - 6} with " \
           "nothing injected)" in caplog.text
    without = ie.run_trials(tiny, tok, [t for t in spec if t["split"] != "distractor"], vectors, 10.0, DISTRACTOR_CFG, "base")
    assert with_them[:-n] == without
    assert all(r["split"] == "distractor" and not r["sampled"] and r["verdict"] in ie.DISTRACTOR_OUTCOMES
               for r in with_them[-n:])
    assert [r["alpha"] > 0 for r in with_them[-n:]] == [t["concept"] is not None for t in distractors(spec)]


def test_a_tiny_run_records_the_trials_and_the_metrics(tmp_path, caplog):
    out = tmp_path / "run"
    assert ie.main(tiny_args(tmp_path, out)) == 0
    trials = [t for t in rundir.read_jsonl(out / "trials.jsonl") if t["split"] == "distractor"]
    metrics = json.loads((out / "metrics.json").read_text())
    for state in ("base", "finetuned"):
        mine = [t for t in trials if t["state"] == state]
        injected = [t for t in mine if t["concept"] is not None]
        assert len(injected) == 6 and all(t["distractor"] != t["concept"] for t in injected)
        assert len(mine) - len(injected) == len({t["distractor"] for t in injected})
        d = metrics["results"][state]["distractor"]
        assert d["all"]["detection"]["n"] == 6 and d["no_injection"]["detection"]["n"] == len(mine) - 6
        assert sum(d["all"][o]["k"] for o in ie.DISTRACTOR_OUTCOMES) == 6
        assert d["all"]["named_injected"]["k"] == sum(t["verdict"] == "named_injected" for t in injected)
    assert "Wrong-concept prompt control" in (out / "results.md").read_text()
    assert (out / "figures" / "distractor_control.png").exists()
    assert "distractor,no_injection,named_distractor" in (out / "metrics.csv").read_text()


def test_paper_tables_show_it_where_the_run_has_it_and_a_dash_where_not(tmp_path):
    import copy
    from conftest import ROOT, load_paper_tables
    pt = load_paper_tables()
    committed = json.loads((ROOT / "figures" / "metrics.json").read_text())
    older = copy.deepcopy(committed)  # a run of a version without the control
    for state in ("base", "finetuned"):
        older["results"][state].pop("distractor", None)
    pt.write_paper_tables(older, None, [], tmp_path / "old")
    old = (tmp_path / "old" / "macros.tex").read_text()
    assert "\\newcommand{\\runDistractorEcho}{---}" in old and "Wrong-concept" not in (
        tmp_path / "old" / "baseline_vs_finetuned.tex").read_text()
    assert "\\newcommand{\\runMatchedFalsePositive}{0.0\\% (0/1)}" in old
    metrics = copy.deepcopy(committed)
    for state in ("base", "finetuned"):
        metrics["results"][state]["distractor"] = summary()
    metrics["settings"]["alphas"].setdefault("1x", 217.0)
    metrics["results"]["finetuned"]["matched_control"]["false_positive"] = ie.rate(1, 1)
    pt.write_paper_tables(metrics, None, [], tmp_path / "new")
    table = (tmp_path / "new" / "baseline_vs_finetuned.tex").read_text()
    assert "Wrong-concept prompt, held-out injected: names it & paper & --- & --- & --- \\\\\n" \
           " & this run & 50.0\\% (1/2) & 50.0\\% (1/2) & +0.0 pp \\\\" in table
    assert " & this run & 50.0\\% (1/2) & 50.0\\% (1/2) & +0.0 pp \\\\" in table.split("nothing injected")[1]
    new = (tmp_path / "new" / "macros.tex").read_text()
    assert "\\newcommand{\\runDistractorSeenDistractor}{50.0\\% (2/4)}" in new
    assert "\\newcommand{\\runMatchedFalsePositive}{100.0\\% (1/1)}" in new
    assert "\\newcommand{\\runBaseMatchedFalsePositive}{0.0\\% (0/1)}" in new
    assert "\\newcommand{\\runDistractorStrength}{1x ($\\alpha{=}217$)}" in new
