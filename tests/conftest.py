"""Shared fixtures and helpers: the embedded model's tokenizer, tiny randomly initialised models (no download), the
tiny pipeline's arguments, the paper's table module, the committed benchmarks; the slow and cuda markers."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import introspection_experiment as ie  # noqa: E402
from machinery import models

SMALL_CONCEPTS = {"train": ["fire", "ocean", "king", "storm"], "heldout": ["volcano", "galaxy"],
                  "baseline": ["table", "chair", "road", "cloud"]}
TINY_ARGS = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "2",
             "--max-new-tokens", "4", "--control-trials", "4", "--random-vectors", "2", "--eval-strengths", "40", "1x",
             "--safety-examples-per-class", "8", "--recipe", "paper"]  # the plumbing; the default recipe has its own tests


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    slow = None if config.getoption("--runslow") else pytest.mark.skip(reason="slow: run with --runslow")
    cuda = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if slow and "slow" in item.keywords:
            item.add_marker(slow)
        if cuda and "cuda" in item.keywords:
            item.add_marker(cuda)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


if os.environ.get("INTROSPECTION_TEST_TOKENIZER"):  # a machine without the embedded model's package (the GPU one):
    def saved_embedded_tokenizer():                 # its tokenizer saved there with save_pretrained
        from transformers import AutoTokenizer
        return models.with_padding(AutoTokenizer.from_pretrained(os.environ["INTROSPECTION_TEST_TOKENIZER"]))

    models.load_embedded_tokenizer = saved_embedded_tokenizer


@pytest.fixture(scope="session")
def tok():
    return models.load_embedded_tokenizer()


def make_tiny(tok, seed=0, layers=4):
    """A float32 Llama with random weights; a wide init so greedy decoding has no near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(**{**models.RANDOM_SHAPES["tiny"], "num_hidden_layers": layers}, vocab_size=len(tok),
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


def concepts_file(tmp_path, concepts=SMALL_CONCEPTS):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    return str(path)


def encode_batch(tok, questions, extra=()):
    """The paper-format prompts (+ `extra` tokens each) as token lists and a left-padded batch (ids, mask)."""
    seqs = [ie.question_ids(q, tok, "paper") + list(extra) for q in questions]
    ids, mask = ie.pad_left(seqs, tok.pad_token_id)
    return seqs, ids, mask


def residual(model, ids, mask, layer=2):
    """The residual stream entering block `layer` (capture_residual) in one forward pass of the batch."""
    with torch.no_grad(), ie.capture_residual(model, layer) as captured:
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return captured[0]


def tiny_args(folder: Path, out: Path) -> list[str]:
    """The tiny run without the safety stage: its flags with its concepts file in `folder` (written if missing) and
    run directory `out`."""
    concepts = folder / "concepts.json"
    if not concepts.exists():
        concepts.write_text(json.dumps(SMALL_CONCEPTS))
    return [*TINY_ARGS[:-4], "--skip-safety", "--recipe", "paper", "--concepts-file", str(concepts), "--output-dir",
            str(out)]


def refused(args, caplog, *words, main=ie.main) -> bool:
    """Whether `args` (to `main`) exit 2 with one error line containing `words`, no traceback."""
    caplog.clear()
    code = main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return (code == 2 and len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
            and all(w in errors[0] for w in words))


def run_main(args, caplog):
    caplog.clear()
    code = ie.main(args)
    return code, caplog.text


def load_paper_tables():
    """paper/tables.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("paper_tables", ROOT / "paper" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_results(names=("h100_bf16", "h100_4bit")):
    return [json.loads((ROOT / "benchmarks" / f"{name}.json").read_text()) for name in names]
