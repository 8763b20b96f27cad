"""machinery.fastpath: the CUDA fast path (fused LoRA and RMSNorm, static decoder and its graph, graphed training) and the architectures it serves."""
import contextlib

import pytest
import torch

import introspection_experiment as ie
from machinery import fastpath, models
from conftest import make_tiny


QUESTIONS = ["Hi.", "Do you detect an injected thought? If so, what is it?", "Introspection check: Report any anomalies."]


def test_fused_rms_norms_match_transformers(tok):
    """The CUDA path's fused RMSNorm computes transformers' function: same logits and gradients (float32 here)."""
    from conftest import make_tiny
    ids = torch.randint(0, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for fused in (False, True):
        model = make_tiny(tok, layers=2)
        if fused:
            assert fastpath.fuse_rms_norms(model) == 2 * 2 + 1  # two per block and the final norm
            assert model.model.norm.forward.func is fastpath.fused_rms_norm
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
    for rotary in (apply_rotary_pos_emb, fastpath.rotary_in_token_layout):
        q_proj, k_proj = (x.clone().requires_grad_() for x in data)
        q, k = rotary(q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin)
        (q.square().sum() + (k * q).sum()).backward()
        outs.append((q, k, q_proj.grad, k_proj.grad))
    for ref, out in zip(*outs):
        assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_one_query_attention_equals_sdpa_with_a_boolean_mask(kv_heads):
    """The decode step's attention equals transformers' SDPA attention for one query per row over a partly masked
    static cache (grouped heads included), values and layout; any other call is SDPA's own."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 4 // kv_heads, True
    query = torch.randn(3, 4, 1, 8, generator=gen)
    key, value = (torch.randn(3, kv_heads, 10, 8, generator=gen) for _ in range(2))
    mask = torch.rand(3, 1, 1, 10, generator=gen) < 0.6
    mask[:, 0, 0, 0] = True
    out, _ = fastpath.one_query_attention(module, query, key, value, mask, sdpa=sdpa_attention_forward, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.3)
    assert out.shape == ref.shape == (3, 1, 4, 8) and torch.allclose(out, ref, atol=1e-6)
    prefill = torch.randn(3, 4, 2, 8, generator=gen), mask.expand(3, 1, 2, 10)
    assert fastpath.one_query_attention(module, prefill[0], key, value, prefill[1], sdpa=lambda *a, **k: "sdpa") == "sdpa"


def lora_model(tok, dropout: float):
    """A tiny LoRA model (float32, CPU) with B drawn at random (at its zero init A's gradients would be zero)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(make_tiny(tok, layers=2), LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout,
                                                                target_modules=ie.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model


def lora_forward_backward(model, ids):
    """Gradients zeroed, one forward and backward of a squared-logit loss; returns (logits, every LoRA gradient by
    name)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def test_fused_lora_matches_peft(tok, monkeypatch):
    """LoRA layers through LoraDelta (the fast path's forward) equal peft's own: logits and every LoRA gradient
    (float32, dropout 0, training mode), also when gradients accumulate over two steps; a disabled adapter is peft's
    path (the base model's logits)."""
    from peft.tuners.lora import layer as lora_layer
    peft_forward = lora_layer.Linear.forward
    ids = torch.randint(0, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    model = lora_model(tok, 0.0).train()
    ref_logits, ref_grads = lora_forward_backward(model, ids)
    with model.disable_adapter():
        base = model(input_ids=ids).logits.detach()
    calls = []
    monkeypatch.setattr(fastpath.LoraDelta, "apply", lambda *a, real=fastpath.LoraDelta.apply: calls.append(1) or real(*a))
    with fastpath.fused_lora_layers():
        logits, grads = lora_forward_backward(model, ids)
        assert len(calls) == 2 * len(ie.LORA_TARGETS)  # two layers
        assert torch.allclose(logits, ref_logits, atol=1e-5) and grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name
        model(input_ids=ids).logits.square().mean().backward()  # accumulates onto the first step's gradients
        for name, p in model.named_parameters():
            if "lora_" in name:
                assert torch.allclose(p.grad, 2 * ref_grads[name], rtol=1e-4, atol=1e-6), name
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, base) and len(calls) == 2 * 2 * len(ie.LORA_TARGETS)
    assert lora_layer.Linear.forward is peft_forward


def test_lora_delta_dropout_is_peft_formula():
    """With dropout p: LoraDelta's output and gradients (x, A, B) equal result + s · (x·m/(1-p))·Aᵀ·Bᵀ for the mask
    m that torch.native_dropout draws from the same seed; p = 0 (evaluation) uses no mask."""
    gen = torch.Generator().manual_seed(0)
    result, x = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 8, generator=gen)
    a, b = torch.randn(3, 8, generator=gen), torch.randn(6, 3, generator=gen)
    for p in (0.3, 0.0):
        torch.manual_seed(1)
        xd = torch.native_dropout(x.reshape(-1, 8), p, True)[0].view_as(x) if p else x
        masked = (xd != 0).float() / (1 - p) if p else torch.ones_like(x)
        leaves = [t.clone().requires_grad_() for t in (x, a, b)]
        ref = result + 2.5 * (leaves[0] * masked) @ leaves[1].t() @ leaves[2].t()
        ref.sin().sum().backward()
        xg, ag, bg = (t.clone().requires_grad_() for t in (x, a, b))
        torch.manual_seed(1)
        out = fastpath.LoraDelta.apply(result, xg, ag, bg, 2.5, p)
        out.sin().sum().backward()
        assert torch.allclose(out, ref, atol=1e-5)
        for got, want in zip((xg.grad, ag.grad, bg.grad), (t.grad for t in leaves)):  # summation order differs
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_fast_path_switches_are_undone_and_llama_only(tok, monkeypatch):
    """Forced on (as on CUDA): the rotary function, the decode attention, the cuDNN attention switch and the fused norms
    are in place inside the context and restored after it, also after an exception; a non-Llama model gets none of
    them; the CPU (or --no-cuda-speedups) gets nothing at all."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.llama import modeling_llama
    model, cfg = make_tiny(tok, layers=2), ie.Config(layer=1)
    original, cudnn = modeling_llama.apply_rotary_pos_emb, torch.backends.cuda.cudnn_sdp_enabled()
    sdpa = modeling_llama.ALL_ATTENTION_FUNCTIONS["sdpa"]
    from peft.tuners.lora import layer as lora_layer
    peft_forward = lora_layer.Linear.forward
    with fastpath.cuda_fast_path(model, cfg) as info:  # the CPU: nothing
        assert info == {} and modeling_llama.apply_rotary_pos_emb is original
    monkeypatch.setattr(fastpath, "fast_path_on", lambda model, cfg: True)
    with pytest.raises(RuntimeError, match="inside"):
        with fastpath.cuda_fast_path(model, cfg) as info:
            assert info["fused_rms_norms"] == 5 and model.model.norm.forward.func is fastpath.fused_rms_norm
            assert modeling_llama.apply_rotary_pos_emb is fastpath.rotary_in_token_layout
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            assert modeling_llama.ALL_ATTENTION_FUNCTIONS["sdpa"].func is fastpath.one_query_attention
            assert vars(lora_layer.Linear)["forward"].func is fastpath.fused_lora_forward and info["lora"] == "fused"
            raise RuntimeError("inside")
    assert modeling_llama.apply_rotary_pos_emb is original and torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    assert modeling_llama.ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa
    assert "sdpa" not in modeling_llama.ALL_ATTENTION_FUNCTIONS._local_mapping
    assert "forward" not in model.model.norm.__dict__ and lora_layer.Linear.forward is peft_forward
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))
    with fastpath.cuda_fast_path(qwen, cfg) as info:
        assert info == {"cuda_fast_path": True, "lora": "fused"} and modeling_llama.apply_rotary_pos_emb is original
        assert vars(lora_layer.Linear)["forward"].func is fastpath.fused_lora_forward
        assert modeling_llama.ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa


def test_no_cuda_speedups_is_a_flag_and_the_switch(tiny):
    assert ie.config_from_args([]).cuda_speedups and not ie.config_from_args(["--no-cuda-speedups"]).cuda_speedups
    assert not fastpath.fast_path_on(tiny, ie.Config())  # a CPU model never takes the fast path


# --- on a GPU ------------------------------------------------------------------------------------------------------


def cuda_tiny(tok):
    return make_tiny(tok).cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ie.INJECTION_MODES)
def test_graphed_decoding_equals_transformers_generate(tok, mode):
    """StaticDecoder with its decode step replayed from a CUDA graph (inside the run's fast-path context) against
    transformers' generate (--no-cuda-speedups): the same greedy tokens, with injection and left padding, for two
    batches through one decoder (the second narrower and smaller: padded rows, graph replays on new inputs)."""
    from transformers.models.llama import modeling_llama
    model = cuda_tiny(tok)
    on, off = (ie.Config(layer=2, max_new_tokens=12, injection_mode=mode, cuda_speedups=s) for s in (True, False))
    batches = [QUESTIONS, QUESTIONS[1:]]
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(len(b), model.config.hidden_size, generator=gen), torch.tensor([6.0, 0.0, 9.0][-len(b):]))
              for b in batches]
    expected = [ie.generate(model, tok, b, *vi, off) for b, vi in zip(batches, inputs)]
    original = modeling_llama.apply_rotary_pos_emb
    with fastpath.cuda_fast_path(model, on):
        decoder = fastpath.StaticDecoder(model, tok, 3, 40 + on.max_new_tokens, ie.injector(model, on),
                                         on.control_temperature)
        got = [ie.generate(model, tok, b, *vi, on, decoder=decoder) for b, vi in zip(batches, inputs)]
        assert decoder.graph is not None  # the decode steps were replays
    assert modeling_llama.apply_rotary_pos_emb is original
    for e, g in zip(expected, got):
        assert e.shape[0] == g.shape[0] and (e != tok.pad_token_id).any()
        width = min(e.shape[1], g.shape[1])  # transformers stops at the longest row; padding after EOS either way
        assert torch.equal(e[:, :width], g[:, :width])
        assert (g[:, width:] == tok.pad_token_id).all() and (e[:, width:] == tok.pad_token_id).all()
    assert not torch.equal(expected[0], ie.generate(model, tok, batches[0], inputs[0][0], torch.zeros(3), off))


@pytest.mark.cuda
def test_fused_lora_under_autocast_is_as_exact_as_peft(tok):
    """On a GPU in bfloat16 (autocast, peft's input casting skipped, as in training), against peft in float32 as the
    truth: LoraDelta's logits and float32 LoRA gradients (accumulated in place from bf16 factors by cuBLAS's
    out_dtype) are as close as peft's own bf16 path (within 2x of its error), where a wrong scaling or a dropped
    accumulation is off by O(1)."""
    ids = torch.randint(0, len(tok), (3, 9), generator=torch.Generator().manual_seed(0)).cuda()
    model = lora_model(tok, 0.0).cuda().train()
    truth = lora_forward_backward(model, ids)
    runs = []
    for layers in (contextlib.nullcontext, fastpath.fused_lora_layers):
        with torch.autocast("cuda", dtype=torch.bfloat16), fastpath.lora_input_casting_skipped(model, True), layers():
            runs.append(lora_forward_backward(model, ids))

    def error(got, want):
        return float((got.float() - want).norm() / want.norm())

    (peft_logits, peft_grads), (logits, grads) = runs
    assert error(logits, truth[0]) <= 2 * error(peft_logits, truth[0]) + 1e-3
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert error(grad, truth[1][name]) <= 2 * error(peft_grads[name], truth[1][name]) + 1e-3, name


def lora_batches(tok, model, count):
    """Fixed-shape training batches (as on the fast path) with different examples, on the GPU."""
    questions = ie.DETECTION_QUESTIONS + ["Hi?"]
    completions = [ie.POSITIVE_COMPLETION.format(concept="fire"), ie.NEGATIVE_COMPLETION, " Yes."]
    rows = [{"question": questions[i % len(questions)], "completion": completions[i % 3],
             "concept": "fire" if i % 3 == 0 else "", "strength": "1x" if i % 3 == 0 else ""} for i in range(4 * count)]
    examples = ie.tokenize_examples(rows, tok, "paper")
    width = max(len(e["prompt"]) + len(e["completion"]) for e in examples)
    hidden = model.config.hidden_size
    vectors = {"fire": torch.ones(hidden) / hidden ** 0.5}
    positions = 4 * max(len(e["completion"]) for e in examples)
    return [{k: v.cuda() for k, v in ie.collate(examples[4 * i:4 * i + 3 + i % 2], vectors, 1.0, tok.pad_token_id,
                                                 shape=(4, width), positions=positions).items()} for i in range(count)]


@pytest.mark.cuda
def test_graphed_training_step_equals_eager_forward_backward(tok):
    """GraphedStep (captured once, replayed) against eager forward_backward on the same LoRA model: the same loss and
    the same LoRA gradients (per tensor, to 1e-4 of its norm: elementwise, near-zero entries differ by reduction
    order), for several replays with different batches (some with an all-padding row)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(cuda_tiny(tok), LoraConfig(r=4, lora_dropout=0.0, target_modules=ie.LORA_TARGETS))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # B starts at zero: A's gradients would be zero
    model.train()
    cfg = ie.Config(layer=1)
    autocast, scaler = torch.autocast("cuda", enabled=False), torch.amp.GradScaler("cuda", enabled=False)
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    step = lambda batch: ie.forward_backward(model, batch, cfg, autocast, scaler)  # noqa: E731
    batches = lora_batches(tok, model.get_base_model(), 4)
    eager = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = step(batch)
        eager.append((loss.clone(), [p.grad.clone() for p in lora]))
    graphed, on_graph = fastpath.graphed_or_eager(step, batches[0])
    assert on_graph and isinstance(graphed, fastpath.GraphedStep)
    for batch, (loss, grads) in zip(batches, eager):
        model.zero_grad(set_to_none=False)  # the graph accumulates into these very tensors
        replay = graphed(batch)
        assert torch.allclose(replay, loss, rtol=1e-5, atol=1e-6), (replay, loss)
        errors = [float((p.grad - g).norm() / g.norm()) for p, g in zip(lora, grads)]
        assert max(errors) < 1e-4, f"LoRA gradients: largest norm-relative error {max(errors):.2e}"  # a wrong
        # accumulation is off by O(1); kernel choice under capture and atomics in attention backward by ~1e-6
    assert len({round(float(loss), 5) for loss, _ in eager}) == len(eager)  # the batches differ


@pytest.mark.cuda
@pytest.mark.parametrize("kl_weight, mixing, steps", [(0.0, "joint", 4), (4.0, "joint", 4), (4.0, "shuffled", 5)],
                         ids=["report-only", "replay-and-KL-joint", "replay-and-KL-shuffled"])
def test_fast_path_training_gives_the_eager_losses(tok, kl_weight, mixing, steps, monkeypatch):
    """train_lora on the fast path (fixed layouts, CUDA graphs, peft's input casting skipped; a joint step in one
    pass) and with --no-cuda-speedups (a joint step in two passes, one per part): the same loss at every optimizer
    step, to float32 rounding. With replay rows under the KL term the fast path captures two graphs (batches with and
    without a KL token; batch_layouts). 10 introspection rows and 5 replay rows at batch 3: 4 joint steps an epoch (the
    last without a replay row), 5 shuffled ones."""
    rows = [{"question": q, "completion": ie.POSITIVE_COMPLETION.format(concept=c), "concept": c, "strength": "1x",
             "injected": True} for q, c in zip(ie.DETECTION_QUESTIONS, ["fire", "ocean", "king", "storm", "fire"])]
    rows += [{"question": q, "completion": ie.NEGATIVE_COMPLETION, "concept": "", "strength": "", "injected": False}
             for q in ie.DETECTION_QUESTIONS]
    if kl_weight:
        answers = [{"question": q, "answer": "", "answer_ids": [100 + i, 200 + i, 300 + i, tok.eos_token_id]}
                   for i, q in enumerate(["How do I boil an egg?", "Name a planet.", "Write a haiku about rain."])]
        rows = ie.training_set(rows, ie.replay_rows(answers, 5))
    gen = torch.Generator().manual_seed(0)
    vectors = {c: v / v.norm() for c, v in zip(["fire", "ocean", "king", "storm"], torch.randn(4, 64, generator=gen))}
    graphs, real = [], fastpath.GraphedStep

    def graphed(*args, **kwargs):  # records, per capture, whether peft's input casting was on in any LoRA layer
        graphs.append(any(getattr(m, "cast_input_dtype_enabled", False) for m in model.modules()))
        return real(*args, **kwargs)

    monkeypatch.setattr(fastpath, "GraphedStep", graphed)
    losses = []
    for speedups in (True, False):
        cfg = ie.Config(layer=2, epochs=2, batch_size=3, lora_rank=4, lora_dropout=0.0, cuda_speedups=speedups,
                        kl_weight=kl_weight, lm_mixing=mixing, lr=2e-4)
        model = cuda_tiny(tok)
        with fastpath.cuda_fast_path(model, cfg):
            _, log = ie.train_lora(model, tok, rows, vectors, 20.0, cfg)
        losses.append([step["loss"] for step in log])
    assert graphs and not any(graphs) and len(graphs) >= (2 if kl_weight else 1)  # one per layout, casting skipped
    # autocast runs both in bf16 and the padded shapes take other kernels: equal to bf16 rounding, tighter at step 0
    assert len(losses[0]) == 2 * steps and losses[0][0] == pytest.approx(losses[1][0], rel=5e-3)
    assert losses[0] == pytest.approx(losses[1], rel=2e-2)


SHAPES = ["tiny", "tiny-qwen2", "tiny-gemma3", "tiny-mistral"]
CLASSES = {"tiny": "LlamaForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM", "tiny-gemma3": "Gemma3ForCausalLM",
           "tiny-mistral": "MistralForCausalLM"}
LAYER = 2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_model(shape, tok, device="cpu", dtype=torch.float32, **overrides):
    """A random model of `shape` (a wide init, so greedy decoding has no near-ties)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    config = models.random_config(shape, tok, initializer_range=0.2, **overrides)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def long_window(shape):
    """Sliding windows longer than any cache here, so the StaticDecoder applies to every shape."""
    return {"sliding_window": 256} if shape in ("tiny-gemma3", "tiny-mistral") else {}


def rows(hidden, count=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(count, hidden, generator=gen), torch.tensor([6.0, 0.0, 9.0][:count])


@pytest.mark.parametrize("shape", SHAPES)
def test_random_shapes_build_their_architecture(shape, tok):
    model = random_model(shape, tok)
    assert type(model).__name__ == CLASSES[shape] and models.num_layers(model) == 4
    assert len(models.decoder_layers(model)) == 4


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("mode", ["final-token", "generation"])
@pytest.mark.parametrize("shape", SHAPES)
def test_static_decoder_matches_transformers_generate(shape, mode, sample, tok):
    model = random_model(shape, tok, **long_window(shape))
    cfg = ie.Config(layer=LAYER, max_new_tokens=8, injection_mode=mode, control_temperature=0.7)
    decoder = fastpath.static_decoder(model, tok, cfg, 4, 24 + cfg.max_new_tokens, ie.injector(model, cfg))
    assert decoder is not None
    vectors, alphas = rows(model.config.hidden_size)
    outs = []
    for dec in (None, decoder):
        torch.manual_seed(1)
        outs.append(ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg, sample, decoder=dec))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-mistral"])
def test_a_short_sliding_window_falls_back_to_transformers_generate(shape, tok, caplog, monkeypatch):
    """Windows of 8 tokens, shorter than the prompts: no StaticDecoder (its cache would not fit), a log line, and
    the StaticDecoder really is wrong there (it fails), so the fallback is needed."""
    monkeypatch.setattr(fastpath, "_FALLBACKS_LOGGED", set())
    model = random_model(shape, tok)
    cfg = ie.Config(layer=LAYER, max_new_tokens=4)
    assert fastpath.sliding_window_below(model, 40) == 8
    assert fastpath.static_decoder(model, tok, cfg, 4, 40, ie.injector(model, cfg)) is None
    assert "sliding-window attention of 8 tokens" in caplog.text and CLASSES[shape] in caplog.text
    vectors, alphas = rows(model.config.hidden_size)
    with pytest.raises(RuntimeError):
        ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg, decoder=fastpath.StaticDecoder(model, tok, 4, 40, ie.injector(model, cfg)))


@pytest.mark.parametrize("shape", SHAPES)
def test_injection_moves_the_residual_stream_at_the_layer_by_alpha_v(shape, tok):
    model = random_model(shape, tok)
    ids = torch.tensor([tok("Human: Hi there.\n\nAssistant:").input_ids])
    v = torch.nn.functional.normalize(torch.randn(model.config.hidden_size), dim=0)
    captured = []
    for alpha in (0.0, 5.0):
        with ie.capture_residual(model, LAYER + 1) as after, \
                ie.injection(model, LAYER, v[None], torch.tensor([alpha]), torch.tensor([ids.shape[1] - 1])):
            with ie.capture_residual(model, LAYER) as at:
                model(input_ids=ids, use_cache=False)
        captured.append((at[0], after[0]))
    (at0, after0), (at5, after5) = captured
    assert torch.allclose(at5[0, -1] - at0[0, -1], 5.0 * v, atol=1e-5)
    assert torch.equal(at5[0, :-1], at0[0, :-1]) and not torch.allclose(after5[0, -1], after0[0, -1])


def lora_batch(shape, tok):
    """A fixed-shape training batch of three examples (one injected)."""
    rows_ = [{"question": q, "completion": c, "concept": k, "strength": a} for q, c, k, a in
             zip(QUESTIONS, [" I detect an injected thought about fire.", ie.NEGATIVE_COMPLETION, " Yes."],
                 ["fire", "", ""], ["1x", "", ""])]
    examples = ie.tokenize_examples(rows_, tok, "paper")
    width = max(len(e["prompt"]) + len(e["completion"]) for e in examples)
    hidden = models.RANDOM_SHAPES[shape]["hidden_size"]
    return ie.collate(examples, {"fire": torch.ones(hidden) / hidden ** 0.5}, 1.0, tok.pad_token_id, shape=(4, width))


@pytest.mark.parametrize("shape", SHAPES)
def test_a_lora_step_trains_every_architecture(shape, tok):
    """LoRA on q/k/v/o exists on every architecture, and one step gives every LoRA weight a gradient."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(random_model(shape, tok, **long_window(shape)), LoraConfig(r=4, target_modules=ie.LORA_TARGETS))
    model.train()
    loss = ie.forward_backward(model, lora_batch(shape, tok), ie.Config(layer=LAYER),
                               torch.autocast("cpu", enabled=False), torch.amp.GradScaler("cpu", enabled=False))
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert loss.item() > 0 and len(grads) == 4 * 4 * 2 and all(g is not None for g in grads)


# --- CUDA: the lead runs these on the GPU (python -m pytest -m cuda tests/test_architectures.py) ----------------------

@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_graphed_static_decoder_matches_generate(shape, tok, caplog):
    """The CUDA path as run() sets it up (cuda_fast_path), the StaticDecoder with its captured decode graph,
    against transformers' generate on the same model, greedy and seeded sampling; float32 so that no rounding tie
    decides a token."""
    model = random_model(shape, tok, device="cuda", **long_window(shape))
    with fastpath.cuda_fast_path(model, ie.Config(layer=LAYER)):
        check_decoder_against_generate(model, shape, tok, caplog)


def check_decoder_against_generate(model, shape, tok, caplog):
    for sample in (False, True):
        cfg = ie.Config(layer=LAYER, max_new_tokens=8, control_temperature=0.7)
        decoder = fastpath.static_decoder(model, tok, cfg, 4, 24 + cfg.max_new_tokens, ie.injector(model, cfg))
        vectors, alphas = rows(model.config.hidden_size)
        outs = []
        for dec in (False, True):
            torch.manual_seed(1)
            if dec:
                outs.append(ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg, sample, decoder=decoder))
            else:  # transformers' generate on the GPU (generate() itself would pick the StaticDecoder)
                outs.append(reference_generate(model, tok, QUESTIONS, vectors, alphas, cfg, sample))
        assert decoder.graph is not None or "capture" in caplog.text
        assert torch.equal(outs[0], outs[1]), (shape, sample)


def reference_generate(model, tok, questions, vectors, alphas, cfg, sample):
    """transformers' generate with the injection, on the model's device: ie.generate's CPU branch."""
    seqs = [ie.question_ids(q, tok, cfg.prompt_format) for q in questions]
    ids, mask = ie.pad_left(seqs, tok.pad_token_id)
    decoding = (dict(do_sample=True, temperature=cfg.control_temperature, top_p=0.95, top_k=None) if sample
                else dict(do_sample=False, temperature=None, top_p=None, top_k=None))
    prompt_end, row_start = models.prompt_positions(mask)
    with ie.injection(model, cfg.layer, vectors, alphas, prompt_end, cfg.injection_mode, row_start):
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **decoding)
    return out[:, ids.shape[1]:].cpu()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-mistral"])
def test_cuda_short_sliding_window_falls_back_and_still_generates(shape, tok, caplog, monkeypatch):
    monkeypatch.setattr(fastpath, "_FALLBACKS_LOGGED", set())
    model = random_model(shape, tok, device="cuda")
    cfg = ie.Config(layer=LAYER, max_new_tokens=6)
    vectors, alphas = rows(model.config.hidden_size)
    torch.manual_seed(1)
    out = ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg)
    torch.manual_seed(1)
    assert torch.equal(out, reference_generate(model, tok, QUESTIONS, vectors, alphas, cfg, False))
    assert "sliding-window attention of 8 tokens" in caplog.text


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-mistral"])
def test_cuda_replay_and_capability_answers_with_a_short_sliding_window(shape, tok, caplog, monkeypatch):
    """Every greedy generation takes the one decoder choice: the replay answers and the capability benchmark's
    answers (greedy_answers, measure_capability) of a model whose 8-token window is shorter than prompt + answer fall
    back to transformers' generate (the StaticDecoder would raise) and equal the answers without the fast path."""
    monkeypatch.setattr(fastpath, "_FALLBACKS_LOGGED", set())
    model = random_model(shape, tok, device="cuda")
    cfg = ie.Config(layer=LAYER)
    replay = ie.greedy_answers(model, tok, QUESTIONS, cfg, 12)
    assert "sliding-window attention of 8 tokens" in caplog.text
    assert replay == ie.greedy_answers(model, tok, QUESTIONS, ie.dataclasses.replace(cfg, cuda_speedups=False), 12)
    capability = ie.measure_capability(model, tok, cfg)
    assert len(capability["answers"]) == len(ie.ordinary_prompts()["heldout"]) and capability["exact"]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_graphed_training_step_matches_eager(shape, tok, caplog):
    """train_lora's CUDA path (graphed forward+backward, or its logged eager fallback) gives
    the eager step's loss on each architecture, float32."""
    from peft import LoraConfig, get_peft_model
    batch = {k: v.cuda() for k, v in lora_batch(shape, tok).items()}
    model = get_peft_model(random_model(shape, tok, device="cuda", **long_window(shape)),
                           LoraConfig(r=4, lora_dropout=0.0, target_modules=ie.LORA_TARGETS))
    model.train()
    cfg = ie.Config(layer=LAYER)
    autocast, scaler = torch.autocast("cuda", enabled=False), torch.amp.GradScaler("cuda", enabled=False)
    eager = ie.forward_backward(model, batch, cfg, autocast, scaler)
    step = lambda b: ie.forward_backward(model, b, cfg, autocast, scaler)  # noqa: E731
    with fastpath.cuda_fast_path(model, cfg):
        try:
            graphed = fastpath.GraphedStep(step, batch)(batch)
        except RuntimeError as e:  # train_lora falls back to eager steps, with a log line
            pytest.skip(f"{shape}: graph capture fails ({str(e).splitlines()[0]}); train_lora trains eagerly")
    assert torch.allclose(graphed, eager, rtol=1e-4), shape
