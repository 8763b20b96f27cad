"""StaticDecoder (the CUDA generation path, run eagerly here) against transformers' generate: same tokens."""
import pytest
import torch

import introspection_experiment as ie

LAYER = 2
BATCHES = [["Hi.", "Do you detect an injected thought? If so, what is it?", "Introspection check: Report any anomalies."],
           ["Status report.", "Is your thinking compromised?"]]


class WithEos:
    """The tokenizer with another EOS id."""

    def __init__(self, tok, eos_token_id):
        self.tok, self.eos_token_id = tok, eos_token_id

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __call__(self, *args, **kwargs):
        return self.tok(*args, **kwargs)


def rows(tiny, count, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, tiny.config.hidden_size, generator=gen), torch.tensor([6.0, 0.0, 9.0][:count])


def both(tiny, tok, cfg, sample=False, criteria=lambda: None):
    """Each batch through transformers' generate and through one StaticDecoder shared by both batches (4 rows, so
    every batch is padded with extra rows, and the second batch is narrower than the first)."""
    decoder = ie.StaticDecoder(tiny, tok, cfg, 4, 24 + cfg.max_new_tokens)
    for i, questions in enumerate(BATCHES):
        vectors, alphas = rows(tiny, len(questions), i)
        outs = []
        for dec in (None, decoder):
            torch.manual_seed(i)
            outs.append(ie.generate(tiny, tok, questions, vectors, alphas, cfg, sample, criteria(), dec))
        yield outs


@pytest.mark.parametrize("mode", ie.INJECTION_MODES)
def test_greedy_equals_transformers_generate(tiny, tok, mode):
    cfg = ie.Config(layer=LAYER, max_new_tokens=10, injection_mode=mode)
    for reference, static in both(tiny, tok, cfg):
        assert torch.equal(static, reference)
    assert not ie.decoder_layers(tiny)[LAYER]._forward_pre_hooks


def test_injection_changes_the_static_decoder_output(tiny, tok):
    """The comparison above can fail: the decode-step injection (generation mode) changes the tokens."""
    outputs = {}
    for mode in ("final-token", "generation"):
        cfg = ie.Config(layer=LAYER, max_new_tokens=10, injection_mode=mode)
        outputs[mode] = [static for _, static in both(tiny, tok, cfg)]
    assert any(not torch.equal(a, b) for a, b in zip(outputs["final-token"], outputs["generation"]))


def test_seeded_sampling_equals_transformers_generate(tiny, tok):
    cfg = ie.Config(layer=LAYER, max_new_tokens=10, control_temperature=0.7)
    for reference, static in both(tiny, tok, cfg, sample=True):
        assert torch.equal(static, reference)


def test_eos_and_stopping_criteria_end_rows_like_transformers(tiny, tok):
    """A token that greedy decoding emits mid-answer made the EOS, and a criterion that stops rows at different
    steps: rows end (and are padded) at the same step in both paths."""
    cfg = ie.Config(layer=LAYER, max_new_tokens=10)
    vectors, alphas = rows(tiny, 3, 0)
    free = ie.generate(tiny, tok, BATCHES[0], vectors, alphas, cfg)
    eos_tok = WithEos(tok, int(free[0, 3]))
    assert eos_tok.eos_token_id != tok.eos_token_id

    class StopAfter:
        def __init__(self):
            self.width = None

        def __call__(self, ids, scores):
            self.width = self.width or ids.shape[1] - 1
            return torch.tensor([ids.shape[1] - self.width >= 2 + 3 * b for b in range(len(ids))])

    from transformers import StoppingCriteriaList
    for reference, static in both(tiny, eos_tok, cfg, criteria=lambda: StoppingCriteriaList([StopAfter()])):
        assert torch.equal(static, reference)
        assert (reference == eos_tok.pad_token_id).any()


def test_batch_larger_than_the_decoder_is_refused(tiny, tok):
    cfg = ie.Config(layer=LAYER, max_new_tokens=4)
    decoder = ie.StaticDecoder(tiny, tok, cfg, 1, 64)
    with pytest.raises(ValueError, match="exceeds"):
        ie.generate(tiny, tok, BATCHES[1], *rows(tiny, 2, 0), cfg, decoder=decoder)
