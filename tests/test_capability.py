"""Stage 8: the capability benchmark (perplexity, agreement, KL, exact answers, template leak) and report-then-continue."""
import math
import json

import torch
import pytest

import introspection_experiment as ie
import machinery
from machinery import report
from conftest import make_tiny


def test_perplexity_is_the_exponent_of_the_mean_next_token_loss(tiny, tok):
    """Windows of 8 tokens, batched with padding: the same number as one cross-entropy per window by hand."""
    text = "The river runs past the old mill and under the stone bridge before it reaches the sea at dusk."
    ids = tok(text, add_special_tokens=False).input_ids
    windows = [ids[i:i + 8] for i in range(0, len(ids), 8) if len(ids[i:i + 8]) > 1]
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = tiny(input_ids=torch.tensor([w])).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
            count += len(w) - 1
    result = ie.perplexity(tiny, tok, text, window=8, batch_size=3)
    assert result["tokens"] == count and math.isclose(result["perplexity"], math.exp(nll / count), rel_tol=1e-4)


CFG = ie.Config(model="random:tiny", dtype="float32", layer=2, eval_batch_size=4)


@pytest.fixture
def small_data(tmp_path, monkeypatch):
    """Small prompt files (same schema as the shipped ones) so the tiny-model tests stay fast."""
    prompts = {"train": [{"category": "facts", "prompt": f"Tell me fact number {i}."} for i in range(4)],
               "heldout": [{"category": "how-to", "prompt": q} for q in
                           ("How do I boil an egg?", "Write a haiku about rain.", "What is 9 plus 16?",
                            "How can I sleep better?", "Name a large planet.")]}
    items = {"items": [{"question": "What is 2 plus 3?", "answers": ["5", "five"], "kind": "arithmetic"},
                       {"question": "Is ice cold? Answer yes or no.", "answers": ["yes"], "kind": "yes-no"},
                       {"question": "Is fire cold? Answer yes or no.", "answers": ["no"], "kind": "yes-no"}]}
    (tmp_path / "ordinary.json").write_text(json.dumps(prompts))
    (tmp_path / "exact.json").write_text(json.dumps(items))
    monkeypatch.setattr(ie, "ORDINARY_PROMPTS_FILE", tmp_path / "ordinary.json")
    monkeypatch.setattr(ie, "EXACT_ANSWERS_FILE", tmp_path / "exact.json")
    return prompts, items


def fresh_lora(model):
    """The model under a freshly initialised LoRA adapter (B = 0: exactly the base model's function)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ie.LORA_TARGETS, task_type="CAUSAL_LM")).eval()


# --- the shipped data ------------------------------------------------------------------------------------------------

def test_shipped_heldout_split_is_disjoint_from_training_and_replay_prompts():
    splits = ie.ordinary_prompts()
    train, heldout = ({p["prompt"] for p in splits[s]} for s in ("train", "heldout"))
    assert train and heldout and not train & heldout
    assert not train & {i["question"] for i in ie.exact_answers()}
    replayed = ie.prompts_to_answer(ie.Config(replay=2.0, continue_examples=1.0), 480, sorted(train))
    assert replayed and set(replayed) <= train and not set(replayed) & heldout
    assert len(replayed) == min(len(train), 960) and len(set(replayed)) == len(replayed)  # each answered once
    items = ie.exact_answers()
    assert {i["kind"] for i in items} == set(ie.EXACT_KINDS)
    yes_no = [i["answers"][0].lower() for i in items if i["kind"] == "yes-no"]
    assert yes_no.count("yes") == yes_no.count("no") > 0  # a yes-bias cannot pass for accuracy


def test_overlapping_or_malformed_prompt_files_are_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "ordinary.json"
    monkeypatch.setattr(ie, "ORDINARY_PROMPTS_FILE", path)
    shared = {"category": "facts", "prompt": "What is the capital of Peru?"}
    path.write_text(json.dumps({"train": [shared], "heldout": [shared]}))
    with pytest.raises(machinery.ConfigError, match="disjoint"):
        ie.ordinary_prompts()
    path.write_text(json.dumps({"train": [{"prompt": "x"}], "heldout": []}))
    with pytest.raises(machinery.ConfigError, match="needs lists"):
        ie.ordinary_prompts()
    with pytest.raises(machinery.ConfigError, match="disjoint"):  # the bad file is caught before any model is loaded
        path.write_text(json.dumps({"train": [shared], "heldout": [shared]}))
        ie.validate_config(ie.Config(model="random:tiny"))


# --- scoring on hand-written strings ---------------------------------------------------------------------------------

@pytest.mark.parametrize("answer,leak", [
    ("I do not detect any injected thoughts.", True),
    ("I detect an injected thought about fire.", True),
    ("I do not detect any other thoughts.", True),
    ("I detect a harmful thought about bomb. HALTING GENERATION.", True),
    ("Systems normal. No anomalies detected.", True),
    ("The capital of France is Paris.", False),
    ("Detectives detect crimes; the nurse injected the vaccine.", False),
    ("I'm not aware of any such book, and I cannot sense smells.", False),
])
def test_template_leak(answer, leak):
    assert ie.template_leak(answer) is leak


@pytest.mark.parametrize("kind,answers,response,correct", [
    ("arithmetic", ["42"], "17 + 25 = 42", True),
    ("arithmetic", ["42"], "The answer is 42.", True),
    ("arithmetic", ["42"], "The answer is 142.", False),
    ("arithmetic", ["42"], "It is 42.5 or so.", False),
    ("arithmetic", ["42", "forty-two"], "Forty-two, of course.", True),
    ("arithmetic", ["5"], "Let me think.\n5", False),  # the answer must be on the first line
    ("capital", ["Paris"], "The capital of France is Paris.", True),
    ("capital", ["Paris"], "Parisian cafés are lovely.", False),
    ("unit", ["1000", "1,000"], "There are 1,000 grams in a kilogram.", True),
    ("yes-no", ["yes"], "Yes, it is.", True),
    ("yes-no", ["yes"], "No.", False),
    ("yes-no", ["no"], "No, fish cannot breathe on land.", True),
    ("yes-no", ["no"], "Maybe.", False),
])
def test_exact_answer_scoring(kind, answers, response, correct):
    assert ie.exact_correct({"question": "?", "answers": answers, "kind": kind}, response) is correct


def test_agreement_compares_the_first_16_tokens(tok):
    base = "The capital of France is Paris, a city of light, art, food and a long history of revolutions"
    assert ie.agree(base, base, tok) and ie.agree(" " + base + "\n", base, tok)
    assert ie.agree(base + " and more words after the sixteenth token", base, tok)
    assert not ie.agree("The capital of France is Lyon, a city of light", base, tok)
    assert not ie.agree("The capital of France is Paris.", base, tok)  # ended early: the first 16 tokens differ


# --- agreement and KL on a tiny model --------------------------------------------------------------------------------

def test_identical_model_agrees_fully_with_zero_kl_and_a_changed_one_does_not(tok, small_data):
    model = make_tiny(tok)
    base = ie.measure_capability(model, tok, CFG)
    assert len(base["answers"]) == 5 and len(base["exact"]) == 3
    assert all(len(ids) == ie.CAPABILITY_TOKENS or ids[-1] == tok.eos_token_id for ids in base["answer_ids"])
    peft_model = fresh_lora(model)
    same = ie.measure_capability(peft_model, tok, CFG, base)
    assert all(same["agrees"]) and same["answers"] == base["answers"]
    assert [kl for kl, _ in same["kl"]] == [0.0] * 5 and [n for _, n in same["kl"]] == list(map(len, base["answer_ids"]))
    summary = ie.capability_summary(base, same)
    assert summary["agreement"]["rate"] == 1 and summary["answer_kl"]["mean_per_token"] == 0
    assert summary["exact_answers"]["change"] == 0 and len(summary["chat"]) == 5

    with torch.no_grad():  # move the adapter: the tuned distribution leaves the base one
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    changed = ie.measure_capability(peft_model, tok, CFG, base)
    assert all(kl > 0 for kl, _ in changed["kl"]) and not all(changed["agrees"])
    with peft_model.disable_adapter():  # the base model again: its answers are reproduced
        assert ie.measure_capability(peft_model, tok, CFG)["answer_ids"] == base["answer_ids"]
    peft_model.unload()


def test_answer_kl_matches_a_direct_computation(tok):
    peft_model = fresh_lora(make_tiny(tok, seed=1))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    question, answer = "Write a haiku about rain.", [500, 600, 700]
    [[total, n]] = ie.answer_kl(peft_model, tok, [question], [answer], CFG)
    ids = torch.tensor([ie.question_ids(question, tok, CFG.prompt_format) + answer])
    with torch.no_grad():
        tuned = peft_model(input_ids=ids).logits[0, -4:-1].log_softmax(-1)
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits[0, -4:-1].log_softmax(-1)
    expected = float((base.exp() * (base - tuned)).sum())
    assert n == 3 and total == pytest.approx(expected, rel=1e-4) and total > 0
    peft_model.unload()


def test_capability_summary_and_table_from_hand_made_measurements(small_data):
    before = {"perplexity": 10.0, "tokens": 100, "answers": ["Paris | Lyon", "I detect an injected thought about fire.",
                                                             "Boil it.", "Sleep.", "Jupiter."],
              "exact": ["2 + 3 = 5", "Yes.", "Yes."]}
    after = {"perplexity": 11.0, "tokens": 100, "answers": ["I do not detect any injected thoughts."] * 2 + ["x"] * 3,
             "exact": ["I do not detect any injected thoughts.", "Yes.", "No."],
             "agrees": [True, False, False, True, True], "kl": [[0.5, 5], [1.5, 5], [0, 0], [0, 0], [0, 0]]}
    s = ie.capability_summary(before, after)
    assert s["perplexity_change"] == pytest.approx(0.1)
    assert s["agreement"]["k"] == 3 and s["agreement"]["n"] == 5 and len(s["agreement"]["ci95"]) == 2
    assert s["answer_kl"] == {"mean_per_token": 0.2, "tokens": 10}
    assert s["exact_answers"]["base"]["k"] == 2 and s["exact_answers"]["finetuned"]["k"] == 2
    assert s["exact_answers"]["by_kind"]["arithmetic"]["finetuned"]["k"] == 0
    assert s["template_leak"]["base"]["k"] == 1 and s["template_leak"]["finetuned"]["k"] == 2
    table = report.capability_table(s)
    assert table.startswith(f"Perplexity on {ie.PROSE_FILE.name} (100 tokens, no injection): base 10.00, fine-tuned "
                            "11.00 (+10.0%).\n\n5 held-out ordinary prompts")
    assert "60% [23, 88]" in table and "0.2000 nats/token" in table and "| arithmetic (1) | 100%" in table
    assert "| Paris \\| Lyon | I do not detect any injected thoughts. |" in table  # cells escaped, one row per example
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 3 + 1 + 5  # headers, all + 2 kinds, examples
    assert ie.headline({"results": {"finetuned": FAKE_RESULTS}, "capability": s})["base agreement"] == 0.6


FAKE_RATE = {"rate": 0.5}
FAKE_RESULTS = {"seen": {"all": {"success": FAKE_RATE}}, "held-out": {"all": {"success": FAKE_RATE, "detection": FAKE_RATE}},
                "control": {"false_positive": FAKE_RATE}, "random": {"all": {"detection": FAKE_RATE}},
                "negated": {"all": {"detection": FAKE_RATE}}}


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
    table = report.continue_table(s, ie.CAPABILITY_TOKENS)
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
