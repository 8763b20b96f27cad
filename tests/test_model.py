"""Stage 2, model: the decoder blocks of several architectures, random shapes, tokenizers."""
import pytest
import torch

import introspection_experiment as ie


def build(config_cls, **extra):
    from transformers import AutoModelForCausalLM
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, **extra)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_decoder_layers_found_plain_and_peft_wrapped(family):
    import transformers
    from peft import LoraConfig, get_peft_model
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig}[family]
    model = build(config_cls)
    layers = ie.decoder_layers(model)
    assert len(layers) == 3
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=ie.LORA_TARGETS, task_type="CAUSAL_LM"))
    assert ie.decoder_layers(wrapped) is layers
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        clean = wrapped(input_ids=ids).logits
        with ie.injection(wrapped, 1, torch.ones(1, 32), torch.tensor([5.0]), torch.tensor([3])):
            edited = wrapped(input_ids=ids).logits
    assert torch.equal(clean[:, :3], edited[:, :3]) and not torch.equal(clean[:, 3], edited[:, 3])


def test_random_shape_with_a_saved_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    model, loaded, info = ie.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "tok"), dtype="float32"))
    assert info["random_weights"] and loaded("Hi").input_ids == tok("Hi").input_ids
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    with pytest.raises(ie.ConfigError, match="cannot load tokenizer"):
        ie.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "missing")))


def test_deepseek_shape_is_the_real_one():
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**ie.RANDOM_SHAPES["deepseek-llm-7b"]))
    assert sum(p.numel() for p in model.parameters()) == 6_910_365_696  # DeepSeek-LLM-7B's parameter count
    assert ie.num_layers(model) == 30 == ie.model_depth("random:deepseek-llm-7b")
