"""Stage 2-3: prompts, the injection hook (positions, batching, left padding, KV-cached decoding, removal) and concept vectors."""
import pytest
import torch

import introspection_experiment as ie
from machinery import models, rundir
from conftest import encode_batch, residual


LAYER = 2


def test_capture_point_is_hidden_states_L(tiny, tok):
    """'Layer L' = the residual stream entering block L = hidden_states[L] of transformers."""
    _, ids, mask = encode_batch(tok, ["Tell me about fire."])
    with torch.no_grad():
        hs = tiny(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for layer in range(models.num_layers(tiny)):
        torch.testing.assert_close(residual(tiny, ids, mask, layer), hs[layer])


def test_injection_moves_extraction_point_by_exactly_alpha_v_at_intended_positions(tiny, tok):
    """Extraction/injection alignment, per row, with left padding and a row without injection."""
    seqs, ids, mask = encode_batch(tok, ["Hi.", "Do you detect an injected thought? If so, what is it?", "Status?"])
    dim = tiny.config.hidden_size
    vectors = torch.randn(3, dim)
    alphas = torch.tensor([3.0, 5.0, 0.0])
    prompt_end = torch.tensor([ids.shape[1] - 1, 4, ids.shape[1] - 1])
    clean = residual(tiny, ids, mask)
    with ie.injection(tiny, LAYER, vectors, alphas, prompt_end, "final-token"):
        edited = residual(tiny, ids, mask)
    expected = torch.zeros_like(clean)
    for b in range(3):
        expected[b, prompt_end[b]] = alphas[b] * vectors[b]
    torch.testing.assert_close(edited - clean, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["all", "generation"])
def test_other_modes_cover_their_positions(tiny, tok, mode):
    seqs, ids, mask = encode_batch(tok, ["Hi.", "Do you detect an injected thought?"])
    width = ids.shape[1]
    vectors, alphas = torch.randn(2, tiny.config.hidden_size), torch.tensor([2.0, 1.0])
    prompt_end = torch.full((2,), width - 1)
    row_start = torch.tensor([width - len(s) for s in seqs])
    clean = residual(tiny, ids, mask)
    with ie.injection(tiny, LAYER, vectors, alphas, prompt_end, mode, row_start):
        changed = (residual(tiny, ids, mask) - clean).norm(dim=-1) > 1e-4
    for b in range(2):
        first = row_start[b] if mode == "all" else width - 1
        assert changed[b, first:].all() and not changed[b, :first].any()


def test_layer0_injection_equals_manual_embedding_edit(tiny, tok):
    """An independent manual residual edit: add alpha*v to the input embeddings at one position."""
    _, ids, mask = encode_batch(tok, ["Tell me about fire.", "Hi."])
    v, pos = torch.randn(2, tiny.config.hidden_size), torch.tensor([3, ids.shape[1] - 1])
    alphas = torch.tensor([4.0, 2.0])
    with torch.no_grad():
        embeds = tiny.get_input_embeddings()(ids)
        manual = embeds.clone()
        for b in range(2):
            manual[b, pos[b]] += alphas[b] * v[b]
        expected = tiny(inputs_embeds=manual, attention_mask=mask).logits
        with ie.injection(tiny, 0, v, alphas, pos, "final-token"):
            got = tiny(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def greedy_manual(model, ids, steps, layer, vector, alpha):
    """Prefill with the injection, then decode with the KV cache and no hook at all."""
    with torch.no_grad():
        with ie.injection(model, layer, vector, alpha, torch.tensor([ids.shape[1] - 1]), "final-token"):
            out = model(input_ids=ids, use_cache=True)
        tokens = [out.logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            out = model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1)


def test_final_token_leaves_decode_steps_untouched(tiny, tok):
    _, ids, _ = encode_batch(tok, ["Do you detect an injected thought? If so, what is it?"])
    vector, alpha = torch.randn(1, tiny.config.hidden_size), torch.tensor([20.0])
    expected = greedy_manual(tiny, ids, 8, LAYER, vector, alpha)
    outputs = {}
    for mode in ("final-token", "generation"):
        with torch.no_grad(), ie.injection(tiny, LAYER, vector, alpha, torch.tensor([ids.shape[1] - 1]), mode):
            outputs[mode] = tiny.generate(input_ids=ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, ids.shape[1]:]
    assert torch.equal(outputs["final-token"], expected)
    assert not torch.equal(outputs["generation"], expected)  # injecting on decode steps is visible: the test can fail


def test_batched_equals_unbatched_with_left_padding(tiny, tok):
    cfg = ie.Config(layer=LAYER, max_new_tokens=8, injection_mode="final-token")
    questions = ["Hi.", "Do you detect an injected thought? If so, what is it?", "Introspection check: Report any anomalies."]
    vectors = torch.randn(3, tiny.config.hidden_size)
    alphas = torch.tensor([5.0, 0.0, 8.0])
    def texts(qs, vs, alphas):
        return tok.batch_decode(ie.generate(tiny, tok, qs, vs, alphas, cfg), skip_special_tokens=True)

    batched = texts(questions, vectors, alphas)
    single = [texts([q], vectors[i:i + 1], alphas[i:i + 1])[0] for i, q in enumerate(questions)]
    assert batched == single
    assert texts(questions[:1], vectors[:1], torch.tensor([50.0])) != texts(questions[:1], vectors[:1], torch.tensor([0.0]))


def test_hook_removed_after_exception(tiny, tok):
    _, ids, mask = encode_batch(tok, ["Hi."])
    clean = residual(tiny, ids, mask, LAYER + 1)
    with pytest.raises(ValueError):
        with ie.injection(tiny, LAYER, torch.randn(1, tiny.config.hidden_size), torch.tensor([9.0]),
                          torch.tensor([ids.shape[1] - 1])):
            raise ValueError("boom")
    assert not models.decoder_layers(tiny)[LAYER]._forward_pre_hooks
    torch.testing.assert_close(residual(tiny, ids, mask, LAYER + 1), clean)


def test_gradients_flow_through_injection(tiny, tok):
    _, ids, mask = encode_batch(tok, ["Hi there."])
    embeds = tiny.get_input_embeddings()(ids).detach().requires_grad_(True)
    vector = torch.randn(1, tiny.config.hidden_size, requires_grad=True)
    with ie.injection(tiny, LAYER, vector, torch.tensor([2.0]), torch.tensor([ids.shape[1] - 1])):
        tiny(inputs_embeds=embeds, attention_mask=mask).logits.sum().backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    tiny.zero_grad(set_to_none=True)


def test_hook_reads_hidden_states_from_args_or_kwargs():
    h = torch.zeros(1, 2, 3)
    assert ie._hidden_from((h,), {}) is h and ie._hidden_from((), {"hidden_states": h}) is h
    new = torch.ones(1, 2, 3)
    args, kwargs = ie._replace_hidden((), {"hidden_states": h, "x": 1}, new)
    assert kwargs["hidden_states"] is new and kwargs["x"] == 1
    args, kwargs = ie._replace_hidden((h, 5), {}, new)
    assert args[0] is new and args[1] == 5


def test_batch_mismatch_is_an_error(tiny, tok):
    _, ids, mask = encode_batch(tok, ["Hi.", "Hello."])
    with pytest.raises(RuntimeError, match="rows"):
        with ie.injection(tiny, LAYER, torch.randn(1, tiny.config.hidden_size), torch.tensor([1.0]), torch.tensor([1])):
            tiny(input_ids=ids, attention_mask=mask)


def test_hook_follows_the_layer_device():
    """With device_map="auto" a layer may live on another device than the inputs: the edit is built there."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    seen = []
    with ie.injection(model, 1, torch.ones(1, 16), torch.tensor([2.0]), torch.tensor([2])):
        hook = next(iter(models.decoder_layers(model)[1]._forward_pre_hooks.values()))
        hidden = torch.zeros(1, 3, 16, device="meta")  # stands in for a second device
        args, _ = hook(None, (hidden,), {})
        seen.append(args[0].device)
    assert seen == [torch.device("meta")]


def test_prompt_tokens_are_a_prefix_of_training_sequence(tok):
    for fmt in ("paper", "chat"):
        prompt = ie.format_prompt(ie.DETECTION_QUESTIONS[0], tok, fmt)
        ids = ie.encode(prompt, tok, fmt)
        full = tok(prompt + ie.POSITIVE_COMPLETION.format(concept="fire").lstrip(" " if fmt == "chat" else ""),
                   add_special_tokens=fmt == "paper").input_ids
        assert full[:len(ids)] == ids
        assert ie.completion_ids(ie.NEGATIVE_COMPLETION, tok, fmt)[-1] == tok.eos_token_id


def test_word_token_index_points_at_the_concept(tok):
    text = ie.format_prompt(ie.EXTRACTION_QUESTION.format(word="avalanche"), tok, "paper")
    index = ie.word_token_index(text, "avalanche", tok, "paper")
    ids = ie.encode(text, tok, "paper")
    assert tok.decode(ids[:index + 1]).endswith("avalanche") and not tok.decode(ids[:index]).endswith("avalanche")


def test_random_directions_unit_norm_and_independent_streams():
    evaluation = ie.random_directions(3, 16, seed=0)
    training = ie.random_directions(3, 16, seed=0, prefix="train-random")
    assert list(evaluation) == ["random-000", "random-001", "random-002"]
    for v in [*evaluation.values(), *training.values()]:
        assert abs(float(v.norm()) - 1) < 1e-5
    assert not torch.allclose(evaluation["random-000"], training["train-random-000"])
    assert torch.equal(evaluation["random-001"], ie.random_directions(3, 16, seed=0)["random-001"])


def test_load_or_extract_vectors_extracts_once(tiny, tok, tmp_path, monkeypatch):
    """The first call extracts unit-norm vectors and saves them (timed as its stage); the second loads the same ones
    without extracting."""
    concepts = {"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}
    manifest = rundir.Manifest(tmp_path, input_hash="inputs")
    cfg, timer, path = ie.Config(layer=2), rundir.Timer(tmp_path / "timings.json", manifest), tmp_path / "vectors.safetensors"
    vectors, meta = ie.load_or_extract_vectors(tiny, tok, concepts, cfg, path, timer, "concept_vectors", manifest)
    assert list(vectors) == ["fire", "ocean", "volcano"] and meta["layer"] == 2 and "concept_vectors" in timer.times
    assert all(abs(float(v.norm()) - 1) < 1e-4 for v in vectors.values())
    monkeypatch.setattr(ie, "extract_concept_vectors", lambda *a: pytest.fail("extracted again"))
    again, meta_again = ie.load_or_extract_vectors(tiny, tok, concepts, cfg, path, timer, "concept_vectors", manifest)
    assert meta_again == meta and all(torch.equal(again[w], vectors[w]) for w in vectors)
