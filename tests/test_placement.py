"""Models placed by accelerate (--device-map, --max-gpu-memory): the flags, their refusals, the placement record of
metrics.json, the CUDA fast path's fallback for a model on several devices, and the same trials and hidden states
for a model given an explicit device map (on CPU: every module mapped to 'cpu' on its own; on CUDA: split over a GPU
and the CPU, or two GPUs)."""
import json

import pytest
import torch

import introspection_experiment as ie
from conftest import make_tiny
from test_models import save_tiny_folder
from test_validation import refused

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
    vectors = torch.randn(len(QUESTIONS), ie.text_config(model).hidden_size, generator=gen)
    alphas = torch.tensor([8.0, 0.0, 3.0])
    ids = ie.generate(model, tok, QUESTIONS, vectors, alphas, cfg)
    padded, mask = ie.pad_left([ie.question_ids(q, tok, "paper") for q in QUESTIONS], tok.pad_token_id)
    end = torch.full((len(QUESTIONS),), padded.shape[1] - 1)
    device = ie.input_device(model)
    with torch.no_grad(), ie.injection(model, LAYER, vectors, alphas, end), \
            ie.capture_residual(model, LAYER + 1) as captured:
        logits = model(input_ids=padded.to(device), attention_mask=mask.to(device), use_cache=False).logits[:, -1]
    return ids, captured[0].cpu(), logits.cpu()


def test_the_flags_and_their_help():
    cfg = ie.config_from_args(["--device-map", "balanced", "--max-gpu-memory", "20GiB"])
    assert (cfg.device_map, cfg.max_gpu_memory) == ("balanced", "20GiB")
    assert (ie.Config().device_map, ie.Config().max_gpu_memory) == (None, None)
    text = ie.build_parser().format_help()
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
    if isinstance(content, str) and content in ie.DEVICE_MAP_STRATEGIES:
        device_map = content
    elif content is None:
        device_map = str(tmp_path / "missing.json")
    else:
        device_map = str(tmp_path / "map.json")
        (tmp_path / "map.json").write_text(content if isinstance(content, str) else json.dumps(content))
    args = TINY + ["--device-map", device_map, *extra, "--output-dir", str(tmp_path / "run")]
    assert refused(args, caplog, *words)
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
    plain, auto, mapped = (ie.config_hash(tiny_config(device_map=m)) for m in (None, "auto", path))
    assert len({plain, auto, mapped}) == 3
    assert ie.input_digests(tiny_config(device_map=path))["device_map"] == ie.sha256_file(tmp_path / "map.json")
    (tmp_path / "map.json").write_text(json.dumps({"": 0}))
    assert ie.config_hash(tiny_config(device_map=path)) != mapped


def test_placement_requests(monkeypatch):
    """A cap alone asks for strategy auto, that much on each GPU and the CPU's available memory for the rest."""
    import accelerate.utils
    assert ie.placement_request(tiny_config()) == (None, None)
    assert ie.placement_request(tiny_config(device_map="sequential")) == ("sequential", None)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"cpu": 64 * 2**30})  # the available memory
    device_map, max_memory = ie.placement_request(tiny_config(max_gpu_memory="20GiB"))
    assert device_map == "auto" and max_memory == {0: 20 * 2**30, 1: 20 * 2**30, "cpu": 64 * 2**30}


def test_an_explicit_map_gives_the_same_trials_and_hidden_states(tok, tmp_path):
    """random:tiny loaded with every module mapped to 'cpu' on its own (so accelerate placed it and hf_device_map
    exists) draws the same weights and gives the same tokens and residual stream as the unmapped model; its placement
    is recorded for metrics.json."""
    device_map = per_module_map(["cpu", "cpu"])
    cfg = tiny_config(device_map=map_file(tmp_path, device_map))
    plain, _, plain_info = ie.load_model(tiny_config())
    mapped, _, info = ie.load_model(cfg)
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
    assert ie.input_device(model) == torch.device("cpu")
    after = trials_and_hidden(model, tok, cfg)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    model.get_input_embeddings()._hf_hook.execution_device = 0  # as for embeddings offloaded to the CPU
    assert ie.input_device(model) == torch.device("cuda", 0)


def test_a_folder_model_is_placed_by_from_pretrained(tok, tmp_path, monkeypatch):
    """The map and the cap go to from_pretrained; transformers dispatches (and sets hf_device_map) only for a map over
    several devices, so a map all on the CPU leaves a model recorded as on one device."""
    from transformers import AutoModelForCausalLM
    folder = save_tiny_folder(tok, tmp_path / "tiny-folder", "tiny")
    device_map, max_memory, given = per_module_map(["cpu", "cpu"]), {"cpu": 2**34}, []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: given.append(k) or load(*a, **k))
    monkeypatch.setattr(ie, "placement_request", lambda cfg: (device_map, max_memory))  # a cap is CUDA-only
    model, _, info = ie.load_model(ie.Config(model=str(folder), dtype="float32"))
    assert (given[0]["device_map"], given[0]["max_memory"]) == (device_map, max_memory)
    assert info["placement"] == {"device_map": False, "num_devices": 1,
                                 "devices": {"cpu": {"layers": "0-3", "modules": [""]}}}


def test_index_ranges():
    assert ie.index_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and ie.index_ranges([]) == ""


def test_placement_of_a_split_map(tiny):
    """Devices normalised (GPU index 0 -> cuda:0), layers as ranges, a layer covered by a parent entry."""
    tiny.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cuda:1", "model": "cpu",
                          "lm_head": "cpu"}
    try:
        assert ie.placement(tiny) == {"device_map": True, "num_devices": 3, "devices": {
            "cpu": {"layers": "2-3", "modules": ["model", "lm_head"]},
            "cuda:0": {"layers": "0", "modules": ["model.embed_tokens"]},
            "cuda:1": {"layers": "1", "modules": []}}}
        assert ie.model_devices(tiny) == ["cpu", "cuda:0", "cuda:1"]
    finally:
        del tiny.hf_device_map


def test_the_fast_path_falls_back_for_a_model_on_several_devices(tiny, caplog, monkeypatch):
    """The decision on a faked placement: one device keeps the fast path; two GPUs, or a GPU and CPU offload, turn it
    off with one logged line, and metrics.json says why."""
    assert ie.split_fallback([]) is None and ie.split_fallback(["cuda:0"]) is None
    assert ie.split_fallback(["cpu", "cuda:0"]) == ("the model spans 2 devices (cpu, cuda:0): CUDA fast path off, "
                                                    "eager training and transformers' generate")
    monkeypatch.setattr(ie, "input_device", lambda model: torch.device("cuda", 0))
    monkeypatch.setattr(ie, "_FALLBACKS_LOGGED", set())
    cfg = ie.Config(layer=LAYER)
    assert ie.fast_path_on(tiny, cfg)
    tiny.hf_device_map = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}
    try:
        caplog.clear()
        assert not ie.fast_path_on(tiny, cfg) and not ie.fast_path_on(tiny, cfg)
        lines = [r.getMessage() for r in caplog.records if "CUDA fast path off" in r.getMessage()]
        assert lines == [ie.split_fallback(["cuda:0", "cuda:1"])]
        with ie.cuda_fast_path(tiny, cfg) as speedups:
            assert speedups == {"cuda_fast_path": False, "cuda_fast_path_off": lines[0]}
        with ie.cuda_fast_path(tiny, ie.Config(layer=LAYER, cuda_speedups=False)) as speedups:
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
    (model, _, _), (split_model, _, info) = ie.load_model(one), ie.load_model(split)
    assert info["placement"]["num_devices"] == 2 and not ie.fast_path_on(split_model, split)
    (ids, *states), (split_ids, *split_states) = (trials_and_hidden(m, tok, one) for m in (model, split_model))
    assert torch.equal(ids, split_ids)
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(states, split_states))
