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
    for b, e in enumerate(examples):
        n_prompt, n_all = len(e["prompt"]), len(e["prompt"]) + len(e["completion"])
        assert (batch["labels"][b, :n_prompt] == -100).all() and (batch["labels"][b, n_all:] == -100).all()
        assert batch["labels"][b, n_all - 1] == tok.eos_token_id  # EOS is learned although pad == EOS
        assert batch["prompt_end"][b] == n_prompt - 1
    assert batch["alphas"].tolist() == [20.0, 0.0] and batch["vectors"][1].abs().sum() == 0
    padded = ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id, shape=(3, 40))
    assert padded["input_ids"].shape == (3, 40) and (padded["labels"][2] == -100).all()
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
