"""The paper's grading rule and statistics (Wilson CIs, Yates chi-squared), and metric aggregation."""
import pytest

import introspection_experiment as ie

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


def test_strength_parsing():
    assert ie.parse_strength("40") == (40.0, "absolute")
    assert ie.parse_strength("1.5x") == (1.5, "norm")
    assert ie.resolve_alpha("2x", 100.0) == 200.0
    with pytest.raises(ie.ConfigError):
        ie.parse_strength("strong")
