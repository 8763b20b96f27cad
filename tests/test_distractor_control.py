"""The wrong-concept prompt control (after the paper's successor): the evaluation prompt names a distractor concept
while another concept (or nothing) is injected; the three exclusive outcomes, their rates, the table and a tiny run."""
import json

import torch

import introspection_experiment as ie
from conftest import SMALL_CONCEPTS

STRENGTHS = ["0.5x", "1x", "1.5x", "2x"]
CFG = ie.Config(layer=2, max_new_tokens=4, control_trials=3, random_vectors=1)
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
    spec = distractors(ie.build_trials({"train": ["fire"], "heldout": ["volcano"]}, ["1x"], [], CFG))
    assert [(t["concept"], t["distractor"]) for t in spec if t["concept"]] == [("fire", "volcano"), ("volcano", "fire")]
    alone = ie.distractor_trials({"train": ["fire"], "heldout": [], "baseline": ["table"]}, ["1x"], 0)
    assert [(t["concept"], t["distractor"]) for t in alone] == [("fire", "table"), (None, "table")]
    assert ie.distractor_trials({"train": ["fire"], "heldout": []}, ["1x"], 0) == []
    before = [t for t in ie.build_trials(SMALL_CONCEPTS, ["40", "1x"], ["random-000"], CFG) if t["split"] != "distractor"]
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


def graded(response, concept, distractor, pool):
    trial = {"experiment": "introspection", "state": "finetuned", "split": "distractor", "concept": concept,
             "strength": "1x" if concept else None, "pool": pool, "distractor": distractor,
             "question": ie.DISTRACTOR_QUESTION.format(distractor=distractor), "response": response}
    return {**trial, **ie.grade_trial(trial, response)}


def summary():
    detect = " I detect an injected thought about {}."
    rows = [graded(detect.format("fire"), "fire", "ocean", "seen"), graded(detect.format("ocean"), "fire", "ocean", "seen"),
            graded(detect.format("king"), "storm", "king", "seen"), graded(" No.", "king", "fire", "seen"),
            graded(detect.format("volcano"), "volcano", "galaxy", "held-out"),
            graded(detect.format("volcano"), "galaxy", "volcano", "held-out"),
            graded(detect.format("ocean"), None, "ocean", "no-injection"), graded(" No.", None, "king", "no-injection")]
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
    rows = [graded(" I detect an injected thought about ocean.", "fire", "ocean", "seen"),
            graded(" I detect an injected thought about ocean.", None, "ocean", "no-injection"),
            {"experiment": "introspection", "state": "finetuned", "split": "seen", "concept": "fire", "strength": "1x",
             "question": "q", "response": " No.", **ie.grade(" No.", "fire", "seen")}]
    metrics = metrics_of(ie.summarize(rows, ["1x"])["finetuned"])
    table = ie.results_table(metrics)
    assert "Wrong-concept prompt control" in table and "α=1x (10)" in table
    assert "| finetuned | seen concept (n=1) | 0% [0, 79] | 100% [21, 100] | 0% [0, 79] | 100% [21, 100] |" in table
    assert "| finetuned | held-out concept (n=0) | n/a | n/a | n/a | n/a |" in table
    assert "| finetuned | nothing (n=1) | — | 100% [21, 100] | 0% [0, 79] | 100% [21, 100] |" in table
    csv = [row[:7] for row in ie.metrics_csv_rows(metrics)]
    assert ["finetuned", "distractor", "seen", "named_distractor", 1, 1, 1.0] in csv
    assert ["finetuned", "distractor", "no_injection", "named_distractor", 1, 1, 1.0] in csv
    old = metrics_of({k: v for k, v in metrics["results"]["finetuned"].items() if k != "distractor"})
    assert not ie.has_distractor(old) and "Wrong-concept" not in ie.results_table(old)  # runs from before it


def test_the_distractor_trials_run_last_and_change_no_other_trial(tiny, tok, caplog):
    spec = ie.build_trials(SMALL_CONCEPTS, ["40", "1x"], ["random-000"], CFG)
    vectors = {**{w: torch.randn(tiny.config.hidden_size) for w in SMALL_CONCEPTS["train"] + SMALL_CONCEPTS["heldout"]},
               **ie.random_directions(1, tiny.config.hidden_size, 0)}
    vectors.update({ie.negated(c): -vectors[c] for c in SMALL_CONCEPTS["heldout"]})
    with_them = ie.run_trials(tiny, tok, spec, vectors, 10.0, CFG, "base")
    n = len(distractors(spec))
    assert f"Wrong-concept prompt control: {n} trials (6 injected at 40 with another concept named, {n - 6} with " \
           "nothing injected)" in caplog.text
    without = ie.run_trials(tiny, tok, [t for t in spec if t["split"] != "distractor"], vectors, 10.0, CFG, "base")
    assert with_them[:-n] == without
    assert all(r["split"] == "distractor" and not r["sampled"] and r["verdict"] in ie.DISTRACTOR_OUTCOMES
               for r in with_them[-n:])
    assert [r["alpha"] > 0 for r in with_them[-n:]] == [t["concept"] is not None for t in distractors(spec)]


def test_a_tiny_run_records_the_trials_and_the_metrics(tmp_path, caplog):
    from test_rundir import tiny_args
    out = tmp_path / "run"
    assert ie.main(tiny_args(tmp_path, out)) == 0
    trials = [t for t in ie.read_jsonl(out / "trials.jsonl") if t["split"] == "distractor"]
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
