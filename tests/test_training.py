"""Stage 6, LoRA training: batches, the loss mask, the injection position, epoch records."""
import pytest
import torch

import introspection_experiment as ie


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
    layouts = ie.batch_layouts(batches, examples, under_kl)
    assert layouts == {  # each kind's two batches differ enough in width to get a layout each (width_split)
        (False, 10): ((3, 7 + 3), 3 + 4 + 3),  # batch 1: 3 rows, the widest example 6, its targets
        (False, 12): ((4, 8 + 4), 3 + 4 + 3 + 4),  # batch 0: 4 rows, example 3, its targets
        (True, 24): ((3, 3 + 21), 4 + 20 + 21),  # batch 2: 3 rows, example 13
        (True, 26): ((5, 3 + 23), 3 + 4 + 3 + 4 + 23)}  # batch 3: 5 rows, example 15
    assert ie.batch_layouts(batches[:2], examples, under_kl) == {  # no KL: no such layout
        key: layout for key, layout in layouts.items() if not key[0]}
    for idx in batches:
        key = ie.layout_key(idx, examples, under_kl, layouts)
        assert key[0] == any(under_kl[i] for i in idx)
        (rows, width), positions = layouts[key]
        batch = ie.collate([examples[i] for i in idx], {"x": torch.ones(2)}, 1.0, 0, (rows, width), positions)
        assert batch["input_ids"].shape == (rows, width) and batch["where"].shape == (positions,)


def test_a_kind_gets_two_layouts_only_where_that_saves_a_tenth_of_its_padding():
    """width_split: eight narrow batches and two wide ones get a layout each (the narrow ones then carry no padding to
    the wide width); widths 28 and 31 stay one layout (a second would save 5% of the padded tokens, not worth a graph
    capture). batch_layouts keys the two by width and layout_key picks the narrowest that fits."""
    narrow, wide = (4, 10, 30), (4, 30, 100)
    assert ie.width_split([narrow] * 8 + [wide] * 2) == [[narrow] * 8, [wide] * 2]
    close = [(4, 28, 90)] * 5 + [(4, 31, 90)] * 5
    assert ie.width_split(close) == [close]
    examples = [{"prompt": [1] * 4, "completion": [2] * 6}] * 8 + [{"prompt": [1] * 4, "completion": [2] * 26}] * 2
    batches = [[i] for i in range(10)]
    layouts = ie.batch_layouts(batches, examples, [False] * 10)
    assert layouts == {(False, 10): ((1, 10), 6), (False, 30): ((1, 30), 26)}
    assert [ie.layout_key(b, examples, [False] * 10, layouts) for b in batches] == [(False, 10)] * 8 + [(False, 30)] * 2


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
