"""The capability benchmark: shipped splits, rule-based scoring, template leak, agreement and KL on a tiny model."""
import json

import pytest
import torch

import introspection_experiment as ie
from conftest import make_tiny

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
    with pytest.raises(ie.ConfigError, match="disjoint"):
        ie.ordinary_prompts()
    path.write_text(json.dumps({"train": [{"prompt": "x"}], "heldout": []}))
    with pytest.raises(ie.ConfigError, match="needs lists"):
        ie.ordinary_prompts()
    with pytest.raises(ie.ConfigError, match="disjoint"):  # the bad file is caught before any model is loaded
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
    table = ie.capability_table(s)
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
