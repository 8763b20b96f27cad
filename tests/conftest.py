"""Shared fixtures: the embedded model's tokenizer and tiny randomly initialised models (no download)."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import introspection_experiment as ie  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tok():
    return ie.load_embedded_tokenizer()


def make_tiny(tok, seed=0, layers=4):
    """A float32 Llama with random weights; a wide init so greedy decoding has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(**{**ie.RANDOM_SHAPES["tiny"], "num_hidden_layers": layers}, vocab_size=len(tok),
                         initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny(tok):
    return make_tiny(tok)


@pytest.fixture(autouse=True)
def info_logs(caplog):
    import logging
    caplog.set_level(logging.INFO, logger="introspection")
