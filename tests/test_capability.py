"""Stage 8, capability retention: perplexity, the before/after summary and its table."""
import math

import torch

import introspection_experiment as ie


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


def test_capability_summary_and_table():
    prompts = ie.json.loads(ie.CHAT_PROMPTS_FILE.read_text())["prompts"]
    before = {"perplexity": 10.0, "tokens": 100, "chat": ["a | b"] * len(prompts)}
    after = {"perplexity": 12.5, "tokens": 100, "chat": [""] * len(prompts)}
    summary = ie.capability_summary(before, after)
    assert summary["perplexity_change"] == 0.25 and summary["chat"][0] == {"prompt": prompts[0], "base": "a | b",
                                                                           "finetuned": ""}
    lines = ie.capability_table(summary).splitlines()
    assert lines[0] == (f"Perplexity on {ie.PROSE_FILE.name} (100 tokens, no injection): base 10.00, fine-tuned "
                        "12.50 (+25.0%).")
    assert lines[1:4] == ["", "| prompt | base model | fine-tuned |", "|---|---|---|"]
    assert lines[4].endswith("| a \\| b | (empty) |") and len(lines) == 4 + len(prompts)
