"""Per-model correctness: BOS from the tokenizer in perplexity and prompts, the LM head on the last position only
(contiguous), and a base model without chat template refused for --prompt-format chat before its weights load."""
import copy
import logging

import pytest
import torch

import introspection_experiment as ie

WORDS = "the cat sat on a mat human assistant : . ? do you detect".split()


def word_tokenizer(adds_bos: bool):
    """A tiny word-level tokenizer with a BOS token that it adds before every text, or never (like SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "[UNK]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="[UNK]")


def tiny_model(tok):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ie.random_config("tiny", tok)).eval()


@pytest.mark.parametrize("adds_bos", [True, False])
def test_perplexity_windows_start_with_the_tokenizers_bos(adds_bos):
    tok = word_tokenizer(adds_bos)
    model = tiny_model(tok)
    text = " ".join(WORDS * 3)  # 42 tokens: windows of 16, 16, 10
    seen = []
    handle = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True)
    try:
        result = ie.perplexity(model, tok, text, window=16, batch_size=2)
    finally:
        handle.remove()
    rows = torch.cat([torch.nn.functional.pad(b, (0, 17 - b.shape[1]), value=-1) for b in seen])
    assert ie.leading_special_tokens(tok) == ([tok.bos_token_id] if adds_bos else [])
    assert (rows[:, 0] == tok.bos_token_id).all() == adds_bos
    assert result["tokens"] == (42 if adds_bos else 42 - 3)  # with BOS every text token is scored


def test_prompts_carry_the_tokenizers_bos_in_the_paper_format():
    for adds_bos in (True, False):
        tok = word_tokenizer(adds_bos)
        ids = ie.question_ids("do you detect", tok, "paper")
        assert (ids[0] == tok.bos_token_id) == adds_bos
        assert tok.bos_token_id not in ie.completion_ids(" the cat", tok, "paper")


def test_the_embedded_tokenizer_adds_no_bos(tok):
    """SmolLM2 has a BOS token (<|im_start|>) but adds none: its perplexity windows are unchanged."""
    assert tok.bos_token is not None and ie.leading_special_tokens(tok) == []


def test_generate_runs_the_lm_head_on_contiguous_last_positions(tiny, tok):
    """logits_to_keep=1 in the prefill (and one token per decode step), on a contiguous copy of the hidden states."""
    seen = []
    handle = tiny.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], args[0].is_contiguous())))
    try:
        cfg = ie.Config(layer=2, max_new_tokens=3)
        ie.generate(tiny, tok, ["Hi.", "A much longer question than the first one?"],
                    torch.zeros(2, tiny.config.hidden_size), torch.zeros(2), cfg)
        ie.greedy_match(tiny, tok, ["Hi.", "Hello there?"], [[5, 6], [7]], torch.zeros(2, tiny.config.hidden_size),
                        torch.zeros(2), cfg)
    finally:
        handle.remove()
    assert seen[:3] == [(1, True)] * 3 and seen[3] == (3, True)
    assert not tiny.get_output_embeddings()._forward_pre_hooks


def test_activation_reads_run_the_lm_head_on_one_contiguous_position(tiny, tok):
    """Concept vectors and the probe read layer L only: the LM head sees one position per row, contiguous."""
    seen = []
    handle = tiny.get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], args[0].is_contiguous())))
    try:
        cfg = ie.Config(layer=2)
        ie.read_activations(tiny, tok, ["fire", "ocean"], 2, "paper", "prompt-end")
        trials = [{"question": q, "concept": None, "strength": None} for q in ("Hi.", "A much longer question?")]
        ie.probe_features(tiny, tok, trials, {"fire": torch.zeros(tiny.config.hidden_size)}, 1.0, cfg)
    finally:
        handle.remove()
    assert seen == [(1, True)] * 2 and not tiny.get_output_embeddings()._forward_pre_hooks


def test_answer_kl_runs_the_lm_head_on_contiguous_answer_positions(tiny, tok):
    """The teacher-forced KL pass keeps the answer positions (logits_to_keep) on a contiguous copy, with and without
    the adapter."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(copy.deepcopy(tiny), LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    handle = ie.unwrap(model).get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], args[0].is_contiguous())))
    try:
        ie.answer_kl(model, tok, ["Hi.", "A much longer question than the first one?"], [[5, 6], [7]], ie.Config(layer=2))
    finally:
        handle.remove()
    assert seen == [(3, True)] * 2 and not ie.unwrap(model).get_output_embeddings()._forward_pre_hooks


def save_base_model_folder(tok, folder):
    """A local folder: random tiny weights and the embedded tokenizer without its chat template (a base model)."""
    base = copy.deepcopy(tok)
    base.chat_template = None
    tiny_model(base).save_pretrained(folder)
    base.save_pretrained(folder)
    return folder


def test_chat_format_for_a_base_model_is_refused_before_the_weights_load(tok, tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM
    folder = save_base_model_folder(tok, tmp_path / "base-model")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded before the format check")))
    out = tmp_path / "run"
    caplog.clear()
    assert ie.main(["--model", str(folder), "--prompt-format", "chat", "--output-dir", str(out)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "no chat template" in errors[0] and "--prompt-format paper" in errors[0]
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert left in ([], [ie.LOCK_FILE])  # nothing that would refuse the fixed command: at most the released lock
    assert not left or (out / ie.LOCK_FILE).read_text() == ""
