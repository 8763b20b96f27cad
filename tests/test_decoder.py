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


def test_fused_rms_norms_match_transformers(tok):
    """The CUDA path's fused RMSNorm computes transformers' function: same logits and gradients (float32 here)."""
    from conftest import make_tiny
    ids = torch.randint(0, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = make_tiny(tok, layers=2)
        if fused:
            assert ie.fuse_rms_norms(model) == 2 * 2 + 1  # two per block and the final norm
            assert model.model.norm.forward.func is ie.fused_rms_norm
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        results.append((logits.detach(), model.model.layers[1].input_layernorm.weight.grad,
                        model.model.layers[0].self_attn.q_proj.weight.grad))
    for ref, out in zip(*results):
        assert torch.allclose(out, ref, rtol=1e-4, atol=1e-6)


def test_rotary_in_token_layout_matches_transformers():
    """The CUDA path's rotary embedding equals transformers' on [batch, heads, seq, dim] views, values and gradients."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 5, 3, 8, generator=gen) for _ in range(2)]  # projections: [batch, seq, heads, dim]
    cos, sin = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    outs = []
    for rotary in (apply_rotary_pos_emb, ie.rotary_in_token_layout):
        q_proj, k_proj = (x.clone().requires_grad_() for x in data)
        q, k = rotary(q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin)
        (q.square().sum() + (k * q).sum()).backward()
        outs.append((q, k, q_proj.grad, k_proj.grad))
    for ref, out in zip(*outs):
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)
