"""Every architecture through the paths the GPU uses: random-weight Llama, Qwen2, Gemma3 and Mistral shapes; the
StaticDecoder against transformers' generate (run eagerly on the CPU here, and on CUDA with its graph in the
cuda-marked tests), the injection point, and a LoRA training step."""

import pytest
import torch

import introspection_experiment as ie

SHAPES = ["tiny", "tiny-qwen2", "tiny-gemma3", "tiny-mistral"]
CLASSES = {"tiny": "LlamaForCausalLM", "tiny-qwen2": "Qwen2ForCausalLM", "tiny-gemma3": "Gemma3ForCausalLM",
           "tiny-mistral": "MistralForCausalLM"}
QUESTIONS = ["Hi.", "Do you detect an injected thought? If so, what is it?", "Introspection check: Report any anomalies."]
LAYER = 2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_model(shape, tok, device="cpu", dtype=torch.float32, **overrides):
    """A random model of `shape` (a wide init, so greedy decoding has no near-ties)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    config = ie.random_config(shape, tok, initializer_range=0.2, **overrides)
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
    assert type(model).__name__ == CLASSES[shape] and ie.num_layers(model) == 4
    assert len(ie.decoder_layers(model)) == 4


@pytest.mark.parametrize("sample", [False, True])
@pytest.mark.parametrize("mode", ["final-token", "generation"])
@pytest.mark.parametrize("shape", SHAPES)
def test_static_decoder_matches_transformers_generate(shape, mode, sample, tok):
    model = random_model(shape, tok, **long_window(shape))
    cfg = ie.Config(layer=LAYER, max_new_tokens=8, injection_mode=mode, control_temperature=0.7)
    decoder = ie.static_decoder(model, tok, cfg, 4, 24 + cfg.max_new_tokens)
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
    monkeypatch.setattr(ie, "_FALLBACKS_LOGGED", set())
    model = random_model(shape, tok)
    cfg = ie.Config(layer=LAYER, max_new_tokens=4)
    assert ie.sliding_window_below(model, 40) == 8
    assert ie.static_decoder(model, tok, cfg, 4, 40) is None
    assert "sliding-window attention of 8 tokens" in caplog.text and CLASSES[shape] in caplog.text
    vectors, alphas = rows(model.config.hidden_size)
    with pytest.raises(RuntimeError):
        ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg, decoder=ie.StaticDecoder(model, tok, cfg, 4, 40))


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
    hidden = ie.RANDOM_SHAPES[shape]["hidden_size"]
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
    with ie.cuda_fast_path(model, ie.Config(layer=LAYER)):
        check_decoder_against_generate(model, shape, tok, caplog)


def check_decoder_against_generate(model, shape, tok, caplog):
    for sample in (False, True):
        cfg = ie.Config(layer=LAYER, max_new_tokens=8, control_temperature=0.7)
        decoder = ie.static_decoder(model, tok, cfg, 4, 24 + cfg.max_new_tokens)
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
    prompt_end, row_start = ie.prompt_positions(mask)
    with ie.injection(model, cfg.layer, vectors, alphas, prompt_end, cfg.injection_mode, row_start):
        out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=cfg.max_new_tokens,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **decoding)
    return out[:, ids.shape[1]:].cpu()


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", ["tiny-gemma3", "tiny-mistral"])
def test_cuda_short_sliding_window_falls_back_and_still_generates(shape, tok, caplog, monkeypatch):
    monkeypatch.setattr(ie, "_FALLBACKS_LOGGED", set())
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
    with ie.cuda_fast_path(model, cfg):
        try:
            graphed = ie.GraphedStep(step, batch)(batch)
        except RuntimeError as e:  # train_lora falls back to eager steps, with a log line
            pytest.skip(f"{shape}: graph capture fails ({str(e).splitlines()[0]}); train_lora trains eagerly")
    assert torch.allclose(graphed, eager, rtol=1e-4), shape
