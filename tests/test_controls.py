"""The 2026 controls (--introspection-controls, experiment 'controls'): prompt-only injection, the prefill's injection
position, the question-swap and prefill grading rule, the baselines, the summary, the table, and a tiny run."""
import json

import pytest
import torch

import introspection_experiment as ie
from machinery import report, rundir
from conftest import SMALL_CONCEPTS, encode_batch, refused, residual, run_main, tiny_args

LAYER = 2


def test_prompt_mode_equals_a_manual_edit_at_every_real_prompt_position(tiny, tok):
    """Left padding, a row without injection, and two answer tokens after the prompt that must stay untouched."""
    answer = tok(" I detect", add_special_tokens=False).input_ids
    seqs, ids, mask = encode_batch(tok, ["Hi.", "Do you detect an injected thought? If so, what is it?", "Status?"],
                                   answer)
    width = ids.shape[1]
    vectors, alphas = torch.randn(3, tiny.config.hidden_size), torch.tensor([3.0, 5.0, 0.0])
    prompt_end = torch.full((3,), width - 1 - len(answer))
    row_start = torch.tensor([width - len(s) for s in seqs])
    clean = residual(tiny, ids, mask)
    with ie.injection(tiny, LAYER, vectors, alphas, prompt_end, "prompt", row_start):
        edited = residual(tiny, ids, mask)
    expected = torch.zeros_like(clean)
    for b in range(3):
        expected[b, row_start[b]:prompt_end[b] + 1] = alphas[b] * vectors[b]
    torch.testing.assert_close(edited - clean, expected, atol=1e-5, rtol=0)


def test_prompt_mode_leaves_decode_steps_untouched(tiny, tok):
    """Generation in mode 'prompt' = a manual prefill with the whole prompt edited, then KV-cached decoding with no hook
    at all; 'all' (which also edits decode steps) differs, so the comparison can fail."""
    _, ids, _ = encode_batch(tok, ["Do you detect an injected thought? If so, what is it?"])
    vector, alpha, end = torch.randn(1, tiny.config.hidden_size), torch.tensor([8.0]), torch.tensor([ids.shape[1] - 1])
    with torch.no_grad():
        embeds = tiny.get_input_embeddings()(ids)
        with ie.injection(tiny, LAYER, vector, alpha, end, "prompt"):
            out = tiny(input_ids=ids, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(7):
            out = tiny(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    expected = torch.stack(tokens, dim=1)
    outputs = {}
    for mode in ("prompt", "all"):
        with torch.no_grad(), ie.injection(tiny, LAYER, vector, alpha, end, mode):
            outputs[mode] = tiny.generate(input_ids=ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, ids.shape[1]:]
    assert embeds is not None and torch.equal(outputs["prompt"], expected)
    assert not torch.equal(outputs["all"], expected)


def test_prefill_injection_sits_at_the_last_prompt_token_before_the_prefill(tiny, tok):
    """With `prefix`, generate injects at the question's last token (the 'Assistant:' colon); the prefill's tokens come
    after it in the same prefill pass. One block later, nothing before that position moves, and it does."""
    cfg = ie.Config(layer=LAYER, max_new_tokens=1)
    prefix = ie.completion_ids(ie.PREFILL, tok, "paper")[:-1]
    question = ie.DETECTION_QUESTIONS[0]
    end = len(ie.question_ids(question, tok, "paper")) - 1
    vector = torch.randn(1, tiny.config.hidden_size)

    def prefill_residual(alpha):
        with ie.capture_residual(tiny, LAYER + 1) as captured:
            ie.generate(tiny, tok, [question], vector, torch.tensor([alpha]), cfg, prefix=prefix)
        return captured[0][0]

    moved = (prefill_residual(20.0) - prefill_residual(0.0)).norm(dim=-1) > 1e-4
    assert len(moved) == end + 1 + len(prefix)
    assert moved[end] and not moved[:end].any()


def test_grade_named_is_the_concept_anywhere_as_a_whole_word():
    trial = {"concept": "volcano"}
    cases = {"The first word: volcano.": True, "Volcanoes, mostly.": True, "It is about lava and volcanos": True,
             "volcanology is a field.": False, "Nothing comes to mind.": False, "": False}
    for response, named in cases.items():
        graded = ie.grade_named(trial, {"response": response})
        assert graded["concept_named"] is named, response
        assert graded["verdict"] == ("named" if named else "not_named")
    # the prefill's own words never count: only the continuation is graded
    assert not ie.grade_named({"concept": "thought"}, {"response": " nothing in particular."})["concept_named"]


def test_prompt_only_trials_are_graded_by_the_papers_rule():
    trial = {"concept": "fire", "pool": "held-out"}
    assert ie.grade_prompt_only(trial, {"response": "I detect an injected thought about fire."})["verdict"] == "correct"
    assert ie.grade_prompt_only(trial, {"response": "Fire. I detect something."})["verdict"] == "wrong_id"
    assert ie.grade_prompt_only(trial, {"response": "I do not detect anything about fire."})["verdict"] == "missed"


def test_control_trials_cover_the_same_injections():
    concepts = {"train": ["fire", "ocean"], "heldout": ["volcano"]}
    trials = ie.build_control_trials(concepts, ["40", "1x"])
    by = {s: [t for t in trials if t["split"] == s] for s in ("question-swap", "prefill", "prompt-only")}
    assert len(trials) == sum(map(len, by.values()))
    assert {(t["question"], t["concept"], t["strength"]) for t in by["question-swap"]} == {
        (q, "volcano", s) for q in ie.QUESTION_SWAP_QUESTIONS for s in ("40", "1x")}
    for split in ("prefill", "prompt-only"):
        assert sorted((t["pool"], t["concept"]) for t in by[split]) == sorted(
            [("seen", "fire")] * 2 + [("seen", "ocean")] * 2 + [("held-out", "volcano")] * 2)
        assert {t["question"] for t in by[split]} == {ie.DETECTION_QUESTIONS[0]}
    assert {t["prefill"] for t in by["prefill"]} == {" I detect an injected thought about"}


def test_baselines_on_a_tiny_model(tiny, tok):
    """At layer L the injected shift is alpha*v exactly: the nearest concept vector is always the injected one."""
    concepts = {"train": ["fire", "ocean", "music"], "heldout": ["volcano", "galaxy"]}
    gen = torch.Generator().manual_seed(0)
    vectors = {c: torch.nn.functional.normalize(torch.randn(tiny.config.hidden_size, generator=gen), dim=0)
               for c in concepts["train"] + concepts["heldout"]}
    cfg = ie.Config(layer=LAYER, eval_batch_size=8)
    rows = ie.baseline_rows(tiny, tok, concepts, ["1x", "2x"], vectors, 10.0, cfg, "base")
    nearest = [r for r in rows if r["split"] == "nearest-vector"]
    assert len(nearest) == 4 and all(r["verdict"] == "nearest" and r["cosine"] > 0.999 for r in nearest)
    probe = [r for r in rows if r["split"] == "probe"]
    assert [r["pool"] for r in probe] == ["held-out"] * 4 + ["no-injection"] * len(ie.UNSEEN_QUESTIONS)
    assert all(r["detected"] == (r["p_injected"] > 0.5) and r["experiment"] == "controls" for r in probe)
    assert {r["alpha"] for r in probe if r["concept"]} == {10.0, 20.0}


def fake(split, pool, state="base", question=ie.DETECTION_QUESTIONS[0], **graded):
    return {"experiment": "controls", "state": state, "split": split, "pool": pool, "question": question, **graded}


def test_summarize_controls_counts_each_rule():
    q1, q2 = ie.QUESTION_SWAP_QUESTIONS
    trials = ([fake("question-swap", "held-out", question=q1, concept_named=True)] * 3
              + [fake("question-swap", "held-out", question=q2, concept_named=False)]
              + [fake("prefill", "seen", concept_named=True), fake("prefill", "held-out", concept_named=False)]
              + [fake("prompt-only", "seen", detected=True, verdict="correct"),
                 fake("prompt-only", "held-out", detected=True, verdict="wrong_id")]
              + [fake("nearest-vector", "held-out", verdict="nearest")] * 2
              + [fake("probe", "held-out", detected=True), fake("probe", "no-injection", detected=False)]
              + [fake("prefill", "seen", state="finetuned", concept_named=False)])
    intro = [{"state": "base", "split": "held-out", "identified": i < 1} for i in range(4)]
    s = ie.summarize_controls(trials, intro)
    swap = s["base"]["question_swap"]
    assert (swap["swap"]["k"], swap["swap"]["n"], swap["introspective"]["k"]) == (3, 4, 1)
    assert swap["introspective_minus_swap"] == pytest.approx(0.25 - 0.75)
    assert swap["by_question"][q1]["rate"] == 1.0 and swap["by_question"][q2]["rate"] == 0.0
    assert s["base"]["prefill"]["seen"]["rate"] == 1.0 and s["base"]["prefill"]["held-out"]["rate"] == 0.0
    assert s["base"]["prompt_only"]["held-out"]["success"]["k"] == 0
    assert s["base"]["prompt_only"]["seen"]["success"]["k"] == 1
    assert s["base"]["nearest_vector"]["held-out"]["k"] == 2
    assert s["base"]["probe"]["false_positive"]["k"] == 0 and s["base"]["probe"]["detection"]["k"] == 1
    assert s["finetuned"]["prefill"]["seen"]["n"] == 1 and s["finetuned"]["question_swap"]["swap"]["n"] == 0
    assert s["base"]["question_swap"]["swap"]["ci95"] == list(ie.wilson(3, 4))


def test_the_flag_off_leaves_the_run_hash_and_directories_as_before():
    off, on = ie.Config(model="random:tiny"), ie.Config(model="random:tiny", introspection_controls=True)
    assert "introspection_controls" not in rundir.run_settings(ie.dataclasses.asdict(off))
    assert rundir.config_hash(off) != rundir.config_hash(on)
    assert rundir.config_diff({k: v for k, v in ie.dataclasses.asdict(off).items() if k != "introspection_controls"},
                              off) == []


def test_controls_with_logprob_scoring_is_refused(caplog):
    assert refused(["--model", "random:tiny", "--introspection-controls", "--scoring", "logprob"], caplog,
                   "--introspection-controls")


def test_tiny_run_with_controls(tmp_path, caplog):
    out = tmp_path / "run"
    code, text = run_main(tiny_args(tmp_path, out) + ["--introspection-controls"], caplog)
    assert code == 0, text
    trials = [t for t in rundir.read_jsonl(out / "trials.jsonl") if t["experiment"] == "controls"]
    strengths, train, held = 2, len(SMALL_CONCEPTS["train"]), len(SMALL_CONCEPTS["heldout"])
    # question swap, prefill and prompt-only (seen + held-out), nearest vector and probe (held-out + never-trained)
    per_state = (held * strengths * (len(ie.QUESTION_SWAP_QUESTIONS) + 2 + 2) + 2 * train * strengths
                 + len(ie.UNSEEN_QUESTIONS))
    assert {s: sum(t["state"] == s for t in trials) for s in ("base", "finetuned")} == {"base": per_state,
                                                                                      "finetuned": per_state}
    assert all(ie.PREFILL not in t["response"] for t in trials if t["split"] == "prefill")  # the continuation alone
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["controls"]) == {"base", "finetuned"}
    assert metrics["controls"]["base"]["nearest_vector"]["held-out"]["rate"] == 1.0
    text = (out / "results.md").read_text()
    assert "The 2026 controls" in text and text.count("| finetuned | question swap |") == 2
    assert report.controls_table(metrics["controls"]) in text
    caplog.clear()
    assert ie.main(tiny_args(tmp_path, out) + ["--introspection-controls"]) == 0
    assert "Loaded controls evaluation of finetuned" in caplog.text


def test_results_markdown_has_no_controls_section_without_them():
    metrics = json.loads((ie.Path(ie.__file__).parent / "figures" / "metrics.json").read_text())
    assert "controls" not in metrics and "2026 controls" not in report.results_markdown(metrics)
