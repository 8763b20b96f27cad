"""Stage 6, LoRA training: collation, steps, the joint loss, the KL term and its base-logits table, replay."""
import json

import pytest
import torch

import introspection_experiment as ie
import machinery
from machinery import fastpath, models, rundir
from conftest import TINY_ARGS, concepts_file, make_tiny, run_main


def test_length_buckets_cover_every_example_once():
    examples = [{"prompt": [0] * (i % 7 + 1), "completion": [0] * (i % 3 + 1)} for i in range(100)]
    batches = ie.length_bucketed_batches(examples, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(100)) and max(map(len, batches)) == 8
    spread = [max(len(examples[i]["prompt"]) + len(examples[i]["completion"]) for i in b)
              - min(len(examples[i]["prompt"]) + len(examples[i]["completion"]) for i in b) for b in batches]
    assert sum(spread) / len(spread) < 3  # random batches of these lengths differ by ~6


def test_collate_masks_prompt_and_injects_at_last_prompt_token(tok):
    examples = ie.tokenize_examples([{"question": "Hi?", "completion": " I detect an injected thought about fire.",
                                      "concept": "fire", "strength": "2x"},
                                     {"question": ie.DETECTION_QUESTIONS[1], "completion": ie.NEGATIVE_COMPLETION,
                                      "concept": "", "strength": ""}], tok, "paper")
    batch = ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id)
    width, where, targets = batch["input_ids"].shape[1], batch["where"].tolist(), batch["targets"].tolist()
    start = 0
    for b, e in enumerate(examples):
        n_prompt, n_all = len(e["prompt"]), len(e["prompt"]) + len(e["completion"])
        span = range(start, start + n_all - n_prompt)  # this row's loss positions: from its last prompt token on
        assert [where[i] for i in span] == [b * width + t for t in range(n_prompt - 1, n_all - 1)]
        assert [targets[i] for i in span] == batch["input_ids"][b, n_prompt:n_all].tolist() == e["completion"]
        assert targets[span[-1]] == tok.eos_token_id  # EOS is learned although pad == EOS
        assert batch["prompt_end"][b] == n_prompt - 1
        start += len(span)
    assert start == len(where) == len(targets) == len(batch["base_rows"]) and not batch["base_rows"].any()
    examples[1]["base_row"] = 7  # set by base_logits_table for an example under the KL term: its rows, in order
    assert ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id)["base_rows"].tolist() == (
        [0] * len(examples[0]["completion"]) + list(range(7, 7 + len(examples[1]["completion"]))))
    assert batch["alphas"].tolist() == [20.0, 0.0] and batch["vectors"][1].abs().sum() == 0
    padded = ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id, shape=(3, 40), positions=30)
    assert padded["input_ids"].shape == (3, 40) and (padded["input_ids"][2] == tok.pad_token_id).all()
    assert padded["where"].shape == padded["targets"].shape == padded["base_rows"].shape == (30,)
    assert padded["where"][:start].tolist() == [w // width * 40 + w % width for w in where]  # the wider layout
    assert (padded["targets"][start:] == -100).all() and (padded["where"][start:] == 0).all()
    assert (padded["base_rows"][start:] == 0).all()
    assert padded["alphas"].tolist() == [20.0, 0.0, 0.0]


def test_train_lora_reports_each_epoch(tok):
    """on_epoch receives one record per epoch: its steps, its mean loss (that of the returned loss log) and its wall
    time; the benchmark times epochs with it."""
    from conftest import make_tiny
    rows = [{"question": q, "completion": c, "concept": k, "strength": s} for q, c, k, s in
            [("Hi?", ie.POSITIVE_COMPLETION.format(concept="fire"), "fire", "1x"),
             (ie.DETECTION_QUESTIONS[0], ie.NEGATIVE_COMPLETION, "", ""),
             (ie.DETECTION_QUESTIONS[1], ie.POSITIVE_COMPLETION.format(concept="fire"), "fire", "2x")]]
    records = []
    cfg = ie.resolve_config(ie.Config(model="random:tiny", layer=1, epochs=2, batch_size=2, lora_rank=2))
    _, losses = ie.train_lora(make_tiny(tok, layers=2), tok, rows, {"fire": torch.ones(64) / 8}, 1.0, cfg,
                              on_epoch=records.append)
    assert [r["epoch"] for r in records] == [0, 1] and [r["steps"] for r in records] == [2, 2] and len(losses) == 4
    for r in records:
        mine = [step["loss"] for step in losses if step["epoch"] == r["epoch"]]
        assert r["mean_loss"] == pytest.approx(sum(mine) / len(mine)) and r["seconds"] > 0


def trainable_lora_model(tok):
    """A tiny model with a seeded LoRA adapter in training mode (no dropout; B random, so every LoRA weight has a
    gradient) and its LoRA parameters."""
    from conftest import make_tiny
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(make_tiny(tok), LoraConfig(r=4, lora_dropout=0.0, target_modules=ie.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    return model, [p for n, p in model.named_parameters() if "lora_" in n]


def test_the_loss_at_the_gathered_positions_is_transformers_loss_over_the_whole_batch(tok):
    """forward_backward computes the LM head at the completion positions only (lm_head_at); its loss is the mean
    cross-entropy transformers computes from full logits and -100-masked labels, and so are its gradients."""
    rows = [{"question": q, "completion": c, "concept": k, "strength": s} for q, c, k, s in
            [("Hi?", ie.POSITIVE_COMPLETION.format(concept="fire"), "fire", "1x"),
             (ie.DETECTION_QUESTIONS[1], ie.NEGATIVE_COMPLETION, "", ""),
             (ie.DETECTION_QUESTIONS[3], " Yes.", "", "")]]
    examples = ie.tokenize_examples(rows, tok, "paper")
    batch = ie.collate(examples, {"fire": torch.ones(64) / 8}, 1.0, tok.pad_token_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for b, e in enumerate(examples):
        labels[b, len(e["prompt"]):len(e["prompt"]) + len(e["completion"])] = torch.tensor(e["completion"])
    model, lora = trainable_lora_model(tok)
    cfg = ie.Config(layer=2, kl_weight=0.0)
    loss = ie.forward_backward(model, batch, cfg, torch.autocast("cpu", enabled=False),
                               torch.amp.GradScaler("cpu", enabled=False))
    grads = [p.grad.clone() for p in lora]
    model.zero_grad(set_to_none=True)
    with ie.injection(model, 2, batch["vectors"], batch["alphas"], batch["prompt_end"]):
        full = model(input_ids=batch["input_ids"], labels=labels, use_cache=False)
    full.loss.backward()
    assert float(loss) == pytest.approx(full.loss.item(), rel=1e-6)
    for g, p in zip(grads, lora):
        assert torch.allclose(g, p.grad, rtol=1e-5, atol=1e-7)


def test_fast_path_layouts_are_the_smallest_that_fit_every_batch_of_their_kind():
    """batch_layouts: per kind (a batch with an example under the KL term, or none), the most rows, the widest row and
    the most loss positions of the batches the layout serves; layout_key sends each batch to the narrowest layout of
    its kind that fits, and collate pads it to that layout."""
    examples = [{"prompt": [1] * (5 + i % 4), "completion": [2] * (3 + i % 2), "concept": "", "strength": "",
                 "part": "report"} for i in range(12)]
    examples += [{"prompt": [1] * 3, "completion": [2] * (20 + i), "concept": "", "strength": "", "part": "lm"}
                 for i in range(4)]  # long replay answers
    under_kl = [False] * 12 + [True] * 4
    batches = [[0, 1, 2, 3], [4, 5, 6], [7, 12, 13], [8, 9, 10, 11, 15]]
    layouts = fastpath.batch_layouts(batches, examples, under_kl)
    assert layouts == {  # each kind's two batches differ enough in width to get a layout each (width_split)
        (False, 10): ((3, 7 + 3), 3 + 4 + 3),  # batch 1: 3 rows, the widest example 6, its targets
        (False, 12): ((4, 8 + 4), 3 + 4 + 3 + 4),  # batch 0: 4 rows, example 3, its targets
        (True, 24): ((3, 3 + 21), 4 + 20 + 21),  # batch 2: 3 rows, example 13
        (True, 26): ((5, 3 + 23), 3 + 4 + 3 + 4 + 23)}  # batch 3: 5 rows, example 15
    assert fastpath.batch_layouts(batches[:2], examples, under_kl) == {  # no KL: no such layout
        key: layout for key, layout in layouts.items() if not key[0]}
    for idx in batches:
        key = fastpath.layout_key(idx, examples, under_kl, layouts)
        assert key[0] == any(under_kl[i] for i in idx)
        (rows, width), positions = layouts[key]
        batch = ie.collate([examples[i] for i in idx], {"x": torch.ones(2)}, 1.0, 0, (rows, width), positions)
        assert batch["input_ids"].shape == (rows, width) and batch["where"].shape == (positions,)


def test_a_kind_gets_two_layouts_only_where_that_saves_a_tenth_of_its_padding():
    """width_split: eight narrow batches and two wide ones get a layout each (the narrow ones then carry no padding to
    the wide width); widths 28 and 31 stay one layout (a second would save 5% of the padded tokens, not worth a graph
    capture). batch_layouts keys the two by width and layout_key picks the narrowest that fits."""
    narrow, wide = (4, 10, 30), (4, 30, 100)
    assert fastpath.width_split([narrow] * 8 + [wide] * 2) == [[narrow] * 8, [wide] * 2]
    close = [(4, 28, 90)] * 5 + [(4, 31, 90)] * 5
    assert fastpath.width_split(close) == [close]
    examples = [{"prompt": [1] * 4, "completion": [2] * 6}] * 8 + [{"prompt": [1] * 4, "completion": [2] * 26}] * 2
    batches = [[i] for i in range(10)]
    layouts = fastpath.batch_layouts(batches, examples, [False] * 10)
    assert layouts == {(False, 10): ((1, 10), 6), (False, 30): ((1, 30), 26)}
    assert [fastpath.layout_key(b, examples, [False] * 10, layouts) for b in batches] == [(False, 10)] * 8 + [(False, 30)] * 2


def test_joint_steps_join_each_introspection_batch_with_a_share_of_the_ordinary_rows():
    """step_batches: joint steps are batches of the report rows, each with one length-bucketed share of the lm rows
    (every row once per epoch); shuffled steps are batches of all rows; without lm rows both are the same batches
    (the paper's recipe does not depend on the mode)."""
    examples = [{"prompt": [1] * (i % 5 + 2), "completion": [2] * 3, "part": "report"} for i in range(10)]
    examples += [{"prompt": [1] * (i % 3 + 2), "completion": [2] * 20, "part": "lm"} for i in range(7)]
    joint = ie.step_batches(examples, 4, torch.Generator().manual_seed(0), joint=True)
    assert len(joint) == 3
    assert sorted(i for b in joint for i in b) == list(range(17))
    assert sorted(sum(examples[i]["part"] == "report" for i in b) for b in joint) == [2, 4, 4]
    assert sorted(sum(examples[i]["part"] == "lm" for i in b) for b in joint) == [1, 3, 3]  # shares of ceil(7 / 3)
    shuffled = ie.step_batches(examples, 4, torch.Generator().manual_seed(0), joint=False)
    assert len(shuffled) == 5 and max(map(len, shuffled)) == 4
    report = examples[:10]
    assert (ie.step_batches(report, 4, torch.Generator().manual_seed(0), joint=True)
            == ie.step_batches(report, 4, torch.Generator().manual_seed(0), joint=False))


def test_joint_loss_is_each_parts_mean_cross_entropy_summed(tok):
    """Under the joint loss a batch of introspection and replay rows has loss = the report rows' mean cross-entropy +
    the replay rows' mean cross-entropy, with the gradients of the two passes that train_lora runs off the fast path;
    shuffled, it is the mean over all the batch's targets."""
    intro = ie.build_dataset(["fire"], ["1x"], 1, seed=0)  # a positive and a negative
    answers = [{"question": "Name a colour.", "answer": " Blue is a colour that many people like.",
                "answer_ids": tok(" Blue is a colour that many people like.", add_special_tokens=False).input_ids}]
    examples = ie.tokenize_examples(ie.training_set(intro, ie.replay_rows(answers, 1)), tok, "paper")
    assert [e["part"] for e in examples] == ["report", "report", "lm"]
    model, lora = trainable_lora_model(tok)
    cfg = ie.Config(layer=2, kl_weight=0.0)
    vectors = {"fire": torch.ones(64) / 8}

    def loss_and_grads(rows, joint):
        model.zero_grad(set_to_none=True)
        loss = ie.forward_backward(model, ie.collate(rows, vectors, 1.0, tok.pad_token_id, joint=joint), cfg,
                                   torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False))
        return float(loss), [p.grad.clone() for p in lora]

    both, grads = loss_and_grads(examples, joint=True)
    report, report_grads = loss_and_grads(examples[:2], joint=True)
    lm, lm_grads = loss_and_grads(examples[2:], joint=True)
    assert both == pytest.approx(report + lm, rel=1e-6) and report > 0 and lm > 0
    for g, a, b in zip(grads, report_grads, lm_grads):
        assert torch.allclose(g, a + b, rtol=1e-4, atol=1e-6)  # other batch shapes: other float32 sums
    n = [len(e["completion"]) for e in examples]
    shuffled, _ = loss_and_grads(examples, joint=False)
    assert shuffled == pytest.approx((report * (n[0] + n[1]) + lm * n[2]) / sum(n), rel=1e-6)


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
        table, rows = ie.base_logits_table(peft_model, examples, [e["kl"] for e in examples], vectors, 1.0, CFG,
                                           tok.pad_token_id, torch.autocast("cpu", enabled=False))
    examples = [{**e, "base_row": row} for e, row in zip(examples, rows)]
    return table, ie.collate(examples, vectors, 1.0, tok.pad_token_id)


def adapter_kl(peft_model, batch, table, cfg=CFG):
    with (ie.injection(peft_model, cfg.layer, batch["vectors"], batch["alphas"], batch["prompt_end"]),
          models.lm_head_at(peft_model, batch["where"]), torch.no_grad()):
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
    table, rows = ie.base_logits_table(model, examples, [e["kl"] for e in examples], vectors, 1.0, CFG,
                                       tok.pad_token_id, torch.autocast("cpu", enabled=False))
    assert rows[0] == 0 and rows[1] > 0 and rows[2] == rows[3] > 0 and rows[1] != rows[2]
    assert len(table) == 1 + len(examples[1]["completion"]) + len(examples[2]["completion"])
    assert (table[0] == 0).all() and (table[1:] != 0).any(dim=1).all()
    assert ie.base_logits_table(model, plain, [False] * 4, vectors, 1.0, CFG, tok.pad_token_id,
                                torch.autocast("cpu", enabled=False)) == (None, [0] * 4)
    assert all("base_row" not in e for e in examples + plain)  # the examples are not written into


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
    graphed = fastpath.GraphedStep(lambda b: ie.forward_backward(peft_model, b, cfg, autocast, scaler, base_logits=table), batch)
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
    manifest = rundir.Manifest(tmp_path, "inputs")
    store = rundir.RunState(tmp_path, manifest)
    cfg = ie.dataclasses.replace(CFG, continue_examples=0.5)
    first = ie.ordinary_training_rows(model, tok, cfg, 8, ["fire"], ["40"], store)
    n_train = len(ie.ordinary_prompts()["train"])
    assert len(calls) == -(-min(8, n_train) // CFG.eval_batch_size) and "replay_answers" in store.timer.times
    assert sum(r["kind"] == "replay" for r in first) == 8 and sum(r["kind"] == "continue" for r in first) == 4
    resumed = rundir.RunState(tmp_path, rundir.Manifest(tmp_path, "inputs", artifacts=dict(manifest.artifacts)))
    again = ie.ordinary_training_rows(model, tok, cfg, 8, ["fire"], ["40"], resumed)
    assert again == first and len(calls) == -(-min(8, n_train) // CFG.eval_batch_size)  # loaded, not regenerated
    assert "replay_answers" not in resumed.timer.times
    assert ie.ordinary_training_rows(model, tok, ie.Config(replay=0.0, continue_examples=0.0), 8, ["fire"], ["40"],
                                     store) == []  # the paper recipe's resolved values: no ordinary rows


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
    continued = [t for t in rundir.read_jsonl(out / "trials.jsonl") if t["experiment"] == "continue"]
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
    with pytest.raises(machinery.ConfigError, match="--lm-mixing must be one of joint, shuffled"):
        ie.resolve_config(ie.Config(model="random:tiny", lm_mixing="mixed"))
    given = ie.resolve_config(ie.Config(model="random:tiny", recipe="paper", kl_weight=2.0))
    assert (given.replay, given.kl_weight) == (0, 2.0)  # a given value wins over the recipe
    assert ie.resolve_config(given) == given  # idempotent
    assert rundir.config_hash(assistant) != rundir.config_hash(paper)
