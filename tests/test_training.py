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
    cfg = ie.Config(layer=1, epochs=2, batch_size=2, lora_rank=2)
    _, losses = ie.train_lora(make_tiny(tok, layers=2), tok, rows, {"fire": torch.ones(64) / 8}, 1.0, cfg,
                              on_epoch=records.append)
    assert [r["epoch"] for r in records] == [0, 1] and [r["steps"] for r in records] == [2, 2] and len(losses) == 4
    for r in records:
        mine = [step["loss"] for step in losses if step["epoch"] == r["epoch"]]
        assert r["mean_loss"] == pytest.approx(sum(mine) / len(mine)) and r["seconds"] > 0


def test_the_loss_at_the_gathered_positions_is_transformers_loss_over_the_whole_batch(tok):
    """forward_backward computes the LM head at the completion positions only (lm_head_at); its loss is the mean
    cross-entropy transformers computes from full logits and -100-masked labels, and so are its gradients."""
    from conftest import make_tiny
    from peft import LoraConfig, get_peft_model
    rows = [{"question": q, "completion": c, "concept": k, "strength": s} for q, c, k, s in
            [("Hi?", ie.POSITIVE_COMPLETION.format(concept="fire"), "fire", "1x"),
             (ie.DETECTION_QUESTIONS[1], ie.NEGATIVE_COMPLETION, "", ""),
             (ie.DETECTION_QUESTIONS[3], " Yes.", "", "")]]
    examples = ie.tokenize_examples(rows, tok, "paper")
    batch = ie.collate(examples, {"fire": torch.ones(64) / 8}, 1.0, tok.pad_token_id)
    labels = torch.full_like(batch["input_ids"], -100)
    for b, e in enumerate(examples):
        labels[b, len(e["prompt"]):len(e["prompt"]) + len(e["completion"])] = torch.tensor(e["completion"])
    torch.manual_seed(0)
    model = get_peft_model(make_tiny(tok), LoraConfig(r=4, lora_dropout=0.0, target_modules=ie.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
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


def test_fast_path_layouts_fit_every_batch_of_their_kind():
    """batch_layouts: a batch holding an example under the KL term fits the wide layout, any other the narrow one."""
    examples = [{"prompt": [1] * (5 + i % 4), "completion": [2] * (3 + i % 2), "concept": "", "strength": ""}
                for i in range(12)]
    examples += [{"prompt": [1] * 3, "completion": [2] * (20 + i), "concept": "", "strength": ""}
                 for i in range(4)]  # long replay answers
    under_kl = [False] * 12 + [True] * 4
    layouts = ie.batch_layouts(examples, under_kl, 4)
    assert layouts == {False: ((4, 8 + 4), 4 * 4), True: ((4, 3 + 23), 4 * 23)}
    assert ie.batch_layouts(examples[:12], under_kl[:12], 4) == {False: ((4, 12), 16)}  # no KL: one layout
    for idx in ie.length_bucketed_batches(examples, 4, torch.Generator().manual_seed(0)):
        kl = any(under_kl[i] for i in idx)
        (rows, width), positions = layouts[kl]
        batch = ie.collate([examples[i] for i in idx], {"x": torch.ones(2)}, 1.0, 0, (rows, width), positions)
        assert batch["input_ids"].shape == (rows, width) and batch["where"].shape == (positions,)
