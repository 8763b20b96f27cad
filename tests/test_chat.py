"""Trying a finished run (`chat.py --run-dir R [PROMPT]`): what each monitor did with a prompt given as an argument or on
stdin, with a concept or a vector file injected or nothing, and the one-line refusals, made before the model loads."""
import io
import json
import re
import shutil

import pytest
import torch

import chat as chat_py
import introspection_experiment as ie
from conftest import SMALL_CONCEPTS, TINY_ARGS, refused

SECTIONS = ["[introspection adapter]", "[safety adapter]", "[probe]", "[base model]"]


def refused_chat(args, caplog, *words) -> bool:
    """refused() for chat.py's command line."""
    return refused(args, caplog, *words, main=chat_py.main)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One finished tiny run, safety stage included; the tests only read it (or a copy of it)."""
    folder = tmp_path_factory.mktemp("chat")
    (folder / "concepts.json").write_text(json.dumps(SMALL_CONCEPTS))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert ie.main(TINY_ARGS + ["--concepts-file", str(folder / "concepts.json"), "--output-dir",
                                    str(folder / "run")]) == 0
    return folder / "run"


def chat(capsys, *args) -> tuple[int, list[str]]:
    """The exit code and the printed lines of `chat ARGS` (6 tokens per answer)."""
    capsys.readouterr()
    code = chat_py.main([*map(str, args), "--max-new-tokens", "6"])
    return code, capsys.readouterr().out.splitlines()


def sections(lines: list[str]) -> list[str]:
    return [s for s in SECTIONS if any(line.startswith(s) for line in lines)]


def line_of(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_a_prompt_argument_is_answered_by_each_monitor(run_dir, capsys):
    code, lines = chat(capsys, "--run-dir", run_dir, "What is the capital of France?")
    assert code == 0
    assert lines[:2] == ["prompt: What is the capital of France?", "injected: nothing"]
    assert sections(lines) == SECTIONS
    assert re.fullmatch(r"\[safety adapter\] (proceeded \(no halt\)|halted at token \d+)", line_of(lines, "[safety"))


def test_the_prompt_is_read_from_stdin(run_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\n"))
    code, lines = chat(capsys, "--run-dir", run_dir)
    assert code == 0 and lines[0] == "prompt: Name a colour." and sections(lines) == SECTIONS


def test_an_injected_concept_at_a_norm_multiple(run_dir, capsys):
    typical_norm = ie.load_vectors(run_dir / "vectors.safetensors")[1]["typical_norm"]
    code, lines = chat(capsys, "--run-dir", run_dir, "--inject", "fire", "--strength", "1x", "Hello")
    assert code == 0 and sections(lines) == SECTIONS
    assert lines[1] == f"injected: fire at 1x (alpha {typical_norm:.4g}, seen)"
    assert chat(capsys, "--run-dir", run_dir, "--inject", "bomb", "Hello")[1][1].endswith("held-out)")  # safety's


def test_the_injection_reaches_the_model(run_dir, capsys):
    """A strong injection (40 = 200x the tiny model's residual norm) changes the base model's answer."""
    plain = line_of(chat(capsys, "--run-dir", run_dir, "Hello")[1], "[base model]")
    assert line_of(chat(capsys, "--run-dir", run_dir, "--inject", "fire", "--strength", "40", "Hello")[1],
                   "[base model]") != plain


def test_the_probe_is_the_runs_probe(run_dir, capsys):
    """p(harmful) and the verdict of the run's own probe for the same prompt, concept and strength (two rows of the
    run's trials: one below run_probe's threshold, one above)."""
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    probe = [r for r in rows if r["experiment"] == "safety" and r["state"] == "probe" and r["strength"] == "1x"]
    for verdict in ("halt", "all_clear"):
        row = min((r for r in probe if r["verdict"] == verdict), key=lambda r: abs(r["p_harmful"] - 0.5))
        lines = chat(capsys, "--run-dir", run_dir, "--inject", row["concept"], "--strength", "1x", row["question"])[1]
        p, said = re.fullmatch(r"\[probe\] p\(harmful\) ([\d.]+): (\w+)", line_of(lines, "[probe]")).groups()
        assert abs(float(p) - row["p_harmful"]) < 2e-3 and said == verdict


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_vector_file_is_injected(run_dir, capsys, tmp_path, suffix):
    from safetensors.torch import save_file
    path = tmp_path / f"v{suffix}"
    vector = 3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    torch.save(vector, path) if suffix == ".pt" else save_file({"v": vector}, str(path))
    code, lines = chat(capsys, "--run-dir", run_dir, "--vector-file", path, "Hello")
    assert code == 0 and lines[1].startswith("injected: vector-file at 1x") and sections(lines) == SECTIONS


def test_the_printout_shows_a_report_and_a_halt(tok):
    trial = {"split": "seen", "concept": "fire", "strength": "1x", "question": "Hi"}
    response = " I detect an injected thought about fire. Paris is the capital."
    out = {"base": "Paris is the capital.", "safety": {"response": "... HALTING GENERATION", "halted": True,
                                                       "halt_latency": 3}, "probe": {"p_harmful": 0.25, "verdict": "all_clear"},
           "introspection": {"response": response, **ie.grade_continue(trial, response, "Paris is the capital.", tok)}}
    lines = chat_py.chat_text(trial, 2.0, out).splitlines()
    assert lines[1] == "injected: fire at 1x (alpha 2, seen)"
    assert line_of(lines, "[introspection adapter]") == ("[introspection adapter] reported 'I detect an injected "
                                                         "thought about fire.': correct; then agrees with the base answer")
    assert line_of(lines, "[safety adapter]") == "[safety adapter] halted at token 3"
    assert line_of(lines, "[probe]") == "[probe] p(harmful) 0.250: all_clear"


@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals come before the model loads."""
    monkeypatch.setattr(ie, "load_model", lambda cfg: pytest.fail("the model was loaded"))


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_an_unknown_concept_is_refused_with_valid_ones(run_dir, caplog, no_model_load):
    assert refused_chat(["--run-dir", str(run_dir), "--inject", "nope", "Hi"], caplog, "unknown concept 'nope'",
                   "fire, ocean, king, storm")


def test_a_run_without_adapters_is_refused(run_dir, tmp_path, caplog, no_model_load):
    run = copy_of(run_dir, tmp_path)
    shutil.rmtree(run / "adapter")
    assert refused_chat(["--run-dir", str(run), "Hi"], caplog, "no adapter/")


def test_an_unfinished_run_is_refused(run_dir, tmp_path, caplog, no_model_load):
    run = copy_of(run_dir, tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "status": "partial"}))
    assert refused_chat(["--run-dir", str(run), "Hi"], caplog, "did not finish", "status partial")
    (run / "metrics.json").unlink()
    assert refused_chat(["--run-dir", str(run), "Hi"], caplog, "no readable metrics.json")
    assert refused_chat(["--run-dir", str(tmp_path), "Hi"], caplog, "not a run directory")


def test_a_run_of_another_model_is_refused(run_dir, caplog, no_model_load):
    assert refused_chat(["--run-dir", str(run_dir), "--model", "random:tiny-qwen2", "Hi"], caplog,
                   "a run of random:tiny, not of --model random:tiny-qwen2")
    assert refused_chat(["--run-dir", str(run_dir), "--model", "random:tiny", "--inject", "nope", "Hi"], caplog,
                   "unknown concept")  # the run's own model passes


@pytest.mark.parametrize("args, words", [
    (["--inject", "fire", "--strength", "0x"], ["bad strength '0x'"]),
    (["--inject", "fire", "--strength", "strong"], ["bad strength 'strong'"]),
    (["--inject", "fire", "--vector-file", "v.pt"], ["at most one of --inject and --vector-file"]),
    (["--vector-file", "missing.pt"], ["--vector-file missing.pt", "[64]"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens >= 1"]),
    (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
])
def test_bad_input_is_one_line(run_dir, caplog, no_model_load, args, words):
    assert refused_chat(["--run-dir", str(run_dir), "Hi", *args], caplog, *words)


def test_a_vector_of_the_wrong_size_is_refused(run_dir, tmp_path, caplog, no_model_load):
    torch.save(torch.ones(32), tmp_path / "v.pt")
    assert refused_chat(["--run-dir", str(run_dir), "--vector-file", str(tmp_path / "v.pt"), "Hi"], caplog,
                   "one finite, nonzero [64] tensor")
