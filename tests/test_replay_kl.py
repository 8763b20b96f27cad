"""Self-distillation replay (--replay) and the KL-to-base term (--kl-weight) on tiny models."""
import json
from pathlib import Path

import pytest
import torch

import introspection_experiment as ie
from conftest import TINY_ARGS, concepts_file, make_tiny, run_main

CFG = ie.Config(model="random:tiny", dtype="float32", layer=2, eval_batch_size=3, replay=1.0, replay_tokens=6,
                batch_size=2, grad_accum=2, epochs=1, lr=1e-2, lora_rank=4, lora_alpha=8)
PROMPTS = ["How do I boil an egg?", "Write a haiku about rain.", "What is 9 plus 16?", "Name a large planet.",
           "Give me a tip for sleeping."]


def fresh_lora(model, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=ie.LORA_TARGETS,
                                            task_type="CAUSAL_LM"))


def negative_and_replay_examples(tok):
    """Tokenized examples: one injected positive (no KL), one negative and one replay row (KL on their completions, the
    negative's with --kl-negatives), and the positive's vector."""
    rows = [{"question": ie.DETECTION_QUESTIONS[0], "concept": "fire", "strength": "40",
             "completion": ie.POSITIVE_COMPLETION.format(concept="fire"), "injected": True},
            {"question": ie.DETECTION_QUESTIONS[1], "concept": "", "strength": "", "completion": ie.NEGATIVE_COMPLETION,
             "injected": False},
            ie.ordinary_row({"question": PROMPTS[0], "answer": "Boil it.", "answer_ids": [5, 6, 7, tok.eos_token_id]},
                            "replay")]
    assert [e["kl"] for e in ie.tokenize_examples(rows, tok, "paper")] == [False, False, True]  # the default
    examples = ie.tokenize_examples(rows, tok, "paper", kl_negatives=True)
    assert [e["kl"] for e in examples] == [False, True, True]
    vectors = {"fire": torch.nn.functional.normalize(torch.randn(64, generator=torch.Generator().manual_seed(0)), dim=0)}
    return examples, vectors


def base_table_and_batch(peft_model, examples, vectors, tok):
    """base_logits_table of the examples under the KL term (the base: peft's disable_adapter()), then their batch."""
    with peft_model.disable_adapter():
        table = ie.base_logits_table(peft_model, examples, [e["kl"] for e in examples], vectors, 1.0, CFG,
                                     tok.pad_token_id, torch.autocast("cpu", enabled=False))
    return table, ie.collate(examples, vectors, 1.0, tok.pad_token_id)


def adapter_kl(peft_model, batch, table, cfg=CFG):
    with (ie.injection(peft_model, cfg.layer, batch["vectors"], batch["alphas"], batch["prompt_end"]),
          ie.lm_head_at(peft_model, batch["where"]), torch.no_grad()):
        logits = peft_model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        return float(ie.kl_to_base(table, batch, logits))


# --- the KL term -----------------------------------------------------------------------------------------------------

def test_kl_is_zero_for_a_fresh_or_disabled_adapter_and_positive_after_one_step(tok):
    peft_model = fresh_lora(make_tiny(tok))
    examples, vectors = negative_and_replay_examples(tok)
    table, batch = base_table_and_batch(peft_model, examples, vectors, tok)
    kl_tokens = len(examples[1]["completion"]) + len(examples[2]["completion"])
    assert table.shape == (1 + kl_tokens, peft_model.get_output_embeddings().weight.shape[0]) and (batch["base_rows"] > 0).sum() == kl_tokens
    assert adapter_kl(peft_model.eval(), batch, table) == 0.0  # LoRA B = 0: the adapter is the base model exactly

    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1.0)
    peft_model.train()
    ie.forward_backward(peft_model, batch, ie.dataclasses.replace(CFG, grad_accum=1), torch.autocast("cpu", enabled=False),
                        torch.amp.GradScaler("cpu", enabled=False), base_logits=table)
    optimizer.step()
    peft_model.eval()
    assert adapter_kl(peft_model, batch, table) > 1e-4
    with peft_model.disable_adapter():
        assert adapter_kl(peft_model, batch, table) == 0.0
    none = {**batch, "base_rows": torch.zeros_like(batch["base_rows"])}
    assert adapter_kl(peft_model, none, table) == 0.0  # no token under the term: 0, not NaN
    peft_model.unload()


def test_kl_covers_only_the_masked_tokens_under_the_same_injection(tok):
    """The table holds the base model's logits at each KL row's completion positions, under that row's own injection,
    as a base pass on the training batch would give them."""
    peft_model = fresh_lora(make_tiny(tok, seed=2)).eval()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    examples, vectors = negative_and_replay_examples(tok)
    examples[1] = {**examples[1], "concept": "fire", "strength": "30"}  # a random negative: its injection counts too
    table, batch = base_table_and_batch(peft_model, examples, vectors, tok)
    assert batch["alphas"].tolist() == [40.0, 30.0, 0.0]
    got = adapter_kl(peft_model, batch, table)
    with ie.injection(peft_model, CFG.layer, batch["vectors"], batch["alphas"], batch["prompt_end"]), torch.no_grad():
        tuned = peft_model(input_ids=batch["input_ids"]).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=batch["input_ids"]).logits
    per_token = ie.kl_divergence(base, tuned)
    terms = [per_token[b, len(e["prompt"]) - 1:len(e["prompt"]) + len(e["completion"]) - 1]
             for b, e in enumerate(examples) if e["kl"]]
    assert got == pytest.approx(float(torch.cat(terms).mean()), rel=1e-5)
    peft_model.unload()


def test_base_logits_table_shares_the_rows_of_identical_examples(tok):
    """Replay rows cycle through the base answers: a repeated example points at its first copy's rows; examples
    outside the term get none, and no example under it gives no table."""
    model = make_tiny(tok)
    examples, vectors = negative_and_replay_examples(tok)
    examples = [dict(e) for e in examples + examples[2:]]
    plain = [dict(e) for e in examples]
    table = ie.base_logits_table(model, examples, [e["kl"] for e in examples], vectors, 1.0, CFG, tok.pad_token_id,
                                 torch.autocast("cpu", enabled=False))
    rows = [e.get("base_row", 0) for e in examples]
    assert rows[0] == 0 and rows[1] > 0 and rows[2] == rows[3] > 0 and rows[1] != rows[2]
    assert len(table) == 1 + len(examples[1]["completion"]) + len(examples[2]["completion"])
    assert (table[0] == 0).all() and (table[1:] != 0).any(dim=1).all()
    assert ie.base_logits_table(model, plain, [False] * 4, vectors, 1.0, CFG, tok.pad_token_id,
                                torch.autocast("cpu", enabled=False)) is None
    assert all("base_row" not in e for e in plain)


def test_kl_weight_trains_with_micro_batches_and_grad_accum(tok):
    """With grad_accum 2 the first optimizer step sees the fresh adapter (KL 0), so its loss equals the KL-free run's;
    later steps differ, and the KL-trained adapter stays closer to the base on the KL tokens."""
    rows = ie.build_dataset(["fire", "ocean"], ["40"], 4, seed=0)
    answers = [{"question": q, "answer": "", "answer_ids": [100 + i, 200 + i, tok.eos_token_id]} for i, q in enumerate(PROMPTS)]
    data = ie.training_set(rows, ie.replay_rows(answers, 8))
    vectors = {c: torch.nn.functional.normalize(torch.randn(64), dim=0) for c in ("fire", "ocean")}
    runs = {}
    for weight in (0.0, 5.0):
        model = make_tiny(tok, seed=3)
        peft_model, losses = ie.train_lora(model, tok, data, vectors, 1.0, ie.dataclasses.replace(CFG, kl_weight=weight))
        table, batch = base_table_and_batch(peft_model, ie.tokenize_examples(data, tok, "paper"), vectors, tok)
        runs[weight] = ([l["loss"] for l in losses], adapter_kl(peft_model, batch, table))
        peft_model.unload()
    (plain, plain_kl), (with_kl, kl_kl) = runs[0.0], runs[5.0]
    assert len(plain) == len(with_kl) == 4  # 16 introspection rows in micro-batches of 2, each joined by a replay
    # row (the joint loss), two micro-batches per optimizer step
    assert plain[0] == pytest.approx(with_kl[0], abs=1e-6) and plain[1:] != pytest.approx(with_kl[1:], abs=1e-6)
    assert 0 < kl_kl < plain_kl


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph of the training step")
def test_graphed_step_with_kl_matches_eager(tok):
    """GPU check for the lead: the KL term, read from the table of base logits, inside the captured CUDA-graph step."""
    model = make_tiny(tok).cuda()
    peft_model = fresh_lora(model).train()
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    examples, vectors = negative_and_replay_examples(tok)
    vectors = {k: v.cuda() for k, v in vectors.items()}
    table, batch = base_table_and_batch(peft_model, examples, vectors, tok)
    batch = {k: v.cuda() for k, v in batch.items()}
    cfg = ie.dataclasses.replace(CFG, kl_weight=1.0, grad_accum=1)
    autocast, scaler = torch.autocast("cuda", enabled=False), torch.amp.GradScaler("cuda", enabled=False)
    eager = ie.forward_backward(peft_model, batch, cfg, autocast, scaler, base_logits=table)
    grads = [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]
    peft_model.zero_grad(set_to_none=False)
    graphed = ie.GraphedStep(lambda b: ie.forward_backward(peft_model, b, cfg, autocast, scaler, base_logits=table), batch)
    peft_model.zero_grad(set_to_none=False)
    loss = graphed(batch)
    assert float(loss) == pytest.approx(float(eager), rel=1e-4)
    for g, p in zip(grads, [p for p in peft_model.parameters() if p.requires_grad]):
        assert torch.allclose(g, p.grad, rtol=1e-3, atol=1e-6)


# --- replay ----------------------------------------------------------------------------------------------------------

def test_replay_targets_are_the_base_models_own_greedy_answers(tok):
    model = make_tiny(tok)
    answers = list(ie.answer_training_prompts(model, tok, PROMPTS, CFG))  # batched (3 + 2), left padded
    for prompt, answer in zip(PROMPTS, answers):  # one prompt at a time through transformers' own generate
        ids = torch.tensor([ie.question_ids(prompt, tok, "paper")])
        own = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=CFG.replay_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        own = own.tolist()
        ended = own.index(tok.eos_token_id) + 1 if tok.eos_token_id in own else len(own)
        assert answer["question"] == prompt and answer["answer_ids"] == own[:ended]
    rows = ie.replay_rows(answers, 7)  # more rows than answers: they cycle
    assert [r["question"] for r in rows] == PROMPTS + PROMPTS[:2]
    data = ie.training_set(ie.build_dataset(["fire"], ["40"], 2, seed=0), rows)
    examples = ie.tokenize_examples(data, tok, "paper", kl_negatives=True)
    replay = [e for e, kind in zip(examples, data["kind"]) if kind == "replay"]
    assert [e["completion"] for e in replay] == [a["answer_ids"] for a in answers] + [a["answer_ids"] for a in answers[:2]]
    assert all(e["kl"] and not e["concept"] for e in replay)
    assert sum(e["kl"] for e in examples) == 7 + 2  # the replay rows and the two negatives


def test_answers_end_at_their_first_eos_which_they_keep():
    assert ie.until_eos([5, 2, 2, 2], 2) == [5, 2] and ie.until_eos([2, 7], 2) == [2]
    assert ie.until_eos([5, 6, 7], 2) == [5, 6, 7]  # cut at the token limit: no EOS


def test_replay_answers_are_generated_once_and_reused_on_resume(tok, tmp_path, monkeypatch):
    model = make_tiny(tok)
    calls = []
    real = ie.generate
    monkeypatch.setattr(ie, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    manifest = ie.Manifest(tmp_path, "inputs")
    store = ie.RunState(tmp_path, manifest)
    cfg = ie.dataclasses.replace(CFG, continue_examples=0.5)
    first = ie.ordinary_training_rows(model, tok, cfg, 8, ["fire"], ["40"], store)
    n_train = len(ie.ordinary_prompts()["train"])
    assert len(calls) == -(-min(8, n_train) // CFG.eval_batch_size) and "replay_answers" in store.timer.times
    assert sum(r["kind"] == "replay" for r in first) == 8 and sum(r["kind"] == "continue" for r in first) == 4
    resumed = ie.RunState(tmp_path, ie.Manifest(tmp_path, "inputs", artifacts=dict(manifest.artifacts)))
    again = ie.ordinary_training_rows(model, tok, cfg, 8, ["fire"], ["40"], resumed)
    assert again == first and len(calls) == -(-min(8, n_train) // CFG.eval_batch_size)  # loaded, not regenerated
    assert "replay_answers" not in resumed.timer.times
    assert ie.ordinary_training_rows(model, tok, ie.Config(recipe="paper"), 8, ["fire"], ["40"], store) == []


@pytest.mark.parametrize("extra,message", [
    (["--replay", "-1"], "--replay must be a finite number >= 0"),
    (["--kl-weight", "nan"], "--kl-weight must be a finite number >= 0"),
    (["--continue-examples", "-0.5"], "--continue-examples must be"),
    (["--replay-tokens", "0"], "--replay-tokens must be >= 1"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
])
def test_bad_language_modelling_flags_are_one_clear_error(tmp_path, caplog, extra, message):
    code, text = run_main(["--model", "random:tiny"] + extra + ["--output-dir", str(tmp_path / "run")], caplog)
    assert code == 2 and message in text and "Traceback" not in text


def test_pipeline_with_replay_kl_and_continue_records_everything_and_resumes(tmp_path, caplog, monkeypatch):
    out = tmp_path / "run"
    args = TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--skip-safety", "--replay", "1", "--kl-weight", "1",
                        "--continue-examples", "0.5", "--replay-tokens", "4", "--output-dir", str(out)]
    code, text = run_main(args, caplog)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    size = metrics["settings"]["dataset_size"]
    assert metrics["settings"]["language_modelling"] == {
        "recipe": "paper", "replay": 1.0, "replay_tokens": 4, "kl_weight": 1.0, "kl_negatives": False,
        "continue_examples": 0.5, "lm_mixing": "joint", "replay_rows": size, "continue_rows": size // 2}  # given values win over the recipe
    assert {"agreement", "answer_kl", "exact_answers", "template_leak"} <= set(metrics["capability"])
    assert set(metrics["continue"]) == set(ie.CONTINUE_SPLITS)
    assert "Report-then-continue" in (out / "results.md").read_text()
    assert {"base agreement", "answer KL (nats/token)", "template leak"} <= set(ie.headline(metrics))
    continued = [t for t in ie.read_jsonl(out / "trials.jsonl") if t["experiment"] == "continue"]
    assert len(continued) == len(ie.ordinary_prompts()["heldout"])

    calls = []
    monkeypatch.setattr(ie, "generate", lambda *a, **k: calls.append(1))
    stamp = (out / "replay_answers" / "dataset_info.json").stat().st_mtime
    code, text = run_main(args, caplog)
    assert code == 0 and calls == [] and "loaded from" in text and "Trained" not in text
    assert (out / "replay_answers" / "dataset_info.json").stat().st_mtime == stamp
    assert json.loads((out / "metrics.json").read_text())["capability"] == metrics["capability"]


def test_recipe_decides_the_unset_language_modelling_options():
    assistant = ie.resolve_config(ie.Config(model="random:tiny"))
    assert {k: getattr(assistant, k) for k in ie.RECIPES["assistant"]} == ie.RECIPES["assistant"]
    paper = ie.resolve_config(ie.Config(model="random:tiny", recipe="paper"))
    assert (paper.replay, paper.kl_weight, paper.continue_examples, paper.lr) == (0, 0, 0, 2e-4)  # the paper's
    assert (assistant.lm_mixing, paper.lm_mixing) == ("joint", "joint")  # no ordinary rows under the paper's recipe
    with pytest.raises(ie.ConfigError, match="--lm-mixing must be one of joint, shuffled"):
        ie.resolve_config(ie.Config(model="random:tiny", lm_mixing="mixed"))
    given = ie.resolve_config(ie.Config(model="random:tiny", recipe="paper", kl_weight=2.0))
    assert (given.replay, given.kl_weight) == (0, 2.0)  # a given value wins over the recipe
    assert ie.resolve_config(given) == given  # idempotent
    assert ie.config_hash(assistant) != ie.config_hash(paper)
