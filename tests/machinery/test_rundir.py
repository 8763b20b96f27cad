"""machinery.rundir: the run directory (lock, config.json, manifest and checksums, resume, interrupts)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import multiprocessing
import pytest

import introspection_experiment as ie
import machinery
from machinery import report, rundir
from conftest import ROOT, SMALL_CONCEPTS, load_paper_tables, tiny_args


def run_main(args, caplog, main=ie.main):
    """Exit code, log text and the error lines of one in-process run of `main`."""
    caplog.clear()
    code = main(args)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    return code, caplog.text, errors


def one_line_refusal(code, text, errors, *words):
    return (code == 2 and len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in text
            and all(w in errors[0] for w in words))


@pytest.fixture(scope="module")
def complete(tmp_path_factory):
    """A complete tiny run (no safety stage): its folder, its flags and its files' bytes."""
    folder = tmp_path_factory.mktemp("complete")
    args = tiny_args(folder, folder / "run")
    assert ie.main(args) == 0
    return folder / "run", args


@pytest.fixture
def copy(complete, tmp_path):
    """A copy of the complete run in this test's folder, and its flags (the same concepts file)."""
    source, args = complete
    shutil.copytree(source, tmp_path / "run")
    return tmp_path / "run", args[:-1] + [str(tmp_path / "run")]


def outputs(run_dir: Path) -> dict:
    """What a run found: its trials (bytes) and metrics, without the stage times and the order stages finished in."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("timings_s")
    metrics["stages_done"] = sorted(metrics["stages_done"])
    return {"trials": (run_dir / "trials.jsonl").read_bytes(), "metrics": metrics}


# --- one process at a time -------------------------------------------------------------------------------------------

def test_a_second_process_on_a_locked_directory_exits_2_naming_the_holder(tmp_path):
    """The same command started twice: the second passes the folder check (its config) and finds the lock held."""
    args = tiny_args(tmp_path, tmp_path / "run")
    command = [sys.executable, str(ROOT / "introspection_experiment.py"), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run" / rundir.LOCK_FILE
        deadline = time.time() + 120
        while not (lock.exists() and lock.read_text().strip()) and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before the second started"
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, lines
        assert f"is in use by pid {first.pid} on " in lines[0] and " since " in lines[0]
        assert first.poll() is None  # the holder was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, caplog):
    target = tmp_path / "precious.txt"
    target.write_text("41 bytes of somebody else's precious data\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / rundir.LOCK_FILE).symlink_to(target)
    code, text, errors = run_main(tiny_args(tmp_path, run_dir), caplog)
    assert one_line_refusal(code, text, errors, rundir.LOCK_FILE, "symbolic link"), errors
    assert target.read_text() == "41 bytes of somebody else's precious data\n"
    assert sorted(p.name for p in run_dir.iterdir()) == [rundir.LOCK_FILE]


@pytest.mark.parametrize("kind", ["symbolic link", "directory", "hard links"])
def test_the_lock_never_opens_a_link_or_a_folder_even_after_the_checks(tmp_path, kind):
    """run_dir_lock itself (a .lock planted between the folder check and the lock): refused, nothing written."""
    target = tmp_path / "precious.txt"
    target.write_text("precious\n")
    lock = tmp_path / rundir.LOCK_FILE
    {"symbolic link": lambda: lock.symlink_to(target), "directory": lock.mkdir,
     "hard links": lambda: os.link(target, lock)}[kind]()
    with pytest.raises(machinery.ConfigError, match=kind):
        with rundir.run_dir_lock(tmp_path):
            pytest.fail("locked through a " + kind)
    assert target.read_text() == "precious\n"


def test_a_lock_file_that_is_a_directory_is_one_line(tmp_path, caplog):
    run_dir = tmp_path / "run"
    (run_dir / rundir.LOCK_FILE).mkdir(parents=True)
    assert one_line_refusal(*run_main(tiny_args(tmp_path, run_dir), caplog), rundir.LOCK_FILE, "directory")


def write_many(path: str, worker: int, count: int) -> None:
    for i in range(count):
        rundir.write_json(Path(path), {"worker": worker, "i": i, "padding": "x" * 20000})


def test_concurrent_atomic_writes_never_collide_and_readers_never_see_a_partial_file(tmp_path):
    target = tmp_path / "shared.json"
    rundir.write_json(target, {"worker": -1})
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=write_many, args=(str(target), w, 150)) for w in range(2)]
    for w in writers:
        w.start()
    partial = 0
    while any(w.is_alive() for w in writers):
        try:
            json.loads(target.read_text())
        except json.JSONDecodeError:
            partial += 1
    for w in writers:
        w.join()
    assert [w.exitcode for w in writers] == [0, 0] and partial == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.json"]  # no temporaries left


# --- content-addressed inputs; no artifacts without a matching config ------------------------------------------------

@pytest.mark.parametrize("split", ["train", "heldout"])
def test_a_changed_concepts_file_is_not_the_same_run(copy, caplog, split):
    run_dir, args = copy
    path = Path(args[args.index("--concepts-file") + 1])
    cfg = ie.resolve_config(ie.config_from_args(args))
    before, original = rundir.config_hash(cfg), path.read_text()
    try:
        path.write_text(json.dumps({**SMALL_CONCEPTS, split: SMALL_CONCEPTS[split][:-1] + ["spider"]}))
        assert rundir.config_hash(cfg) != before  # the default run directory moves with the contents
        code, text, errors = run_main(args, caplog)
    finally:
        path.write_text(original)  # the file the other tests' copies were made with
    assert one_line_refusal(code, text, errors, "different config", "contents of concepts_file")


def test_every_data_file_is_an_input(monkeypatch, tmp_path):
    shutil.copytree(machinery.DATA_DIR, tmp_path / "data")
    monkeypatch.setattr(rundir, "DATA_DIR", tmp_path / "data")
    cfg = ie.Config(model="random:tiny")
    assert set(rundir.run_input_files(cfg)) == {f"data/{p.name}" for p in machinery.DATA_DIR.iterdir()}
    before = rundir.config_hash(cfg)
    (tmp_path / "data" / "new_prompts.json").write_text("[]")
    added = rundir.config_hash(cfg)
    with open(tmp_path / "data" / "prose.txt", "a") as f:
        f.write(" ")
    assert len({before, added, rundir.config_hash(cfg)}) == 3


def test_artifacts_without_a_config_are_not_adopted(copy, caplog):
    run_dir, args = copy
    (run_dir / "config.json").unlink()
    code, text, errors = run_main(args[:-2] + ["--seed", "7", "--output-dir", str(run_dir)], caplog)
    assert one_line_refusal(code, text, errors, "no config.json", "not reused")
    assert not (run_dir / "config.json").exists()


def test_artifacts_without_a_manifest_are_not_adopted(copy, caplog):
    run_dir, args = copy
    (run_dir / "manifest.json").unlink()
    assert one_line_refusal(*run_main(args, caplog), "no manifest.json")


def test_a_refused_folder_is_left_exactly_as_it_was(tmp_path, caplog):
    """A folder that is not a run (a user's notes, a hidden draft folder that looks like a temporary): refused before
    anything is created, deleted or rewritten in it; no lock file is left behind."""
    folder = tmp_path / "notes"
    (folder / ".draft.tmp").mkdir(parents=True)
    (folder / ".draft.tmp" / "chapter.txt").write_text("draft")
    (folder / "todo.txt").write_text("todo")
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    code, text, errors = run_main(tiny_args(tmp_path, folder), caplog)
    assert one_line_refusal(code, text, errors, "todo.txt", "no config.json"), errors
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert (folder / ".draft.tmp" / "chapter.txt").read_text() == "draft"


def test_another_runs_adapter_folder_is_refused_without_planting_anything(copy, caplog):
    run_dir, args = copy
    adapter = run_dir / "adapter"
    before = sorted(p.name for p in adapter.iterdir())
    code, text, errors = run_main(args[:-1] + [str(adapter)], caplog)
    assert one_line_refusal(code, text, errors, "adapter_config.json", "no config.json"), errors
    assert sorted(p.name for p in adapter.iterdir()) == before  # no .lock: the run it belongs to still verifies
    code, text, _ = run_main(args, caplog)
    assert code == 0 and "Trained" not in text


def test_temporaries_of_a_killed_run_are_removed_once_the_folder_is_claimed(copy, caplog):
    run_dir, args = copy
    (run_dir / ".trials.jsonl.k2j3h4g5.tmp").mkdir()
    (run_dir / ".trials.jsonl.k2j3h4g5.tmp" / "trials.jsonl").write_text("half")
    (run_dir / ".notes.tmp").mkdir()  # a hidden folder of the user's, not named as the run names its temporaries
    (run_dir / ".notes.tmp" / "a.txt").write_text("notes")
    code, text, _ = run_main(args, caplog)
    assert code == 0 and not (run_dir / ".trials.jsonl.k2j3h4g5.tmp").exists()
    assert (run_dir / ".notes.tmp" / "a.txt").read_text() == "notes"


def test_a_seeds_folder_holding_other_files_is_refused_before_anything_is_written(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(ie, "load_model", None)  # calling it would be a traceback
    base = tmp_path / "seeds"
    base.mkdir()
    (base / "thesis.tex").write_text("thesis")
    args = tiny_args(tmp_path, base) + ["--seeds", "0", "1"]
    code, text, errors = run_main(args, caplog)
    assert one_line_refusal(code, text, errors, "thesis.tex", "not a --seeds folder"), errors
    assert sorted(p.name for p in base.iterdir()) == ["thesis.tex"]


def test_a_resume_under_other_code_is_refused_naming_the_code_hash(copy, caplog, monkeypatch):
    run_dir, args = copy
    made_by = json.loads((run_dir / "config.json").read_text())["code"]
    assert made_by == rundir.code_hash() and len(made_by) == 64
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    monkeypatch.setattr(rundir, "code_hash", lambda: "f" * 64)  # the script or machinery/ edited since
    code, text, errors = run_main(args, caplog)
    assert one_line_refusal(code, text, errors, "other code", made_by[:12], "f" * 12), errors
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_a_corrupt_config_is_one_line(copy, caplog):
    run_dir, args = copy
    (run_dir / "config.json").write_text('{"config": {"mod')
    assert one_line_refusal(*run_main(args, caplog), "config.json", "unreadable")


# --- verified artifacts ----------------------------------------------------------------------------------------------

ARTIFACTS = {"vectors": "vectors.safetensors", "dataset": "dataset/data-00000-of-00001.arrow",
             "adapter": "adapter/adapter_model.safetensors", "trials": "trials.jsonl", "capability": "capability.json"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_bit], ids=["truncated", "bit-flipped"])
@pytest.mark.parametrize("kind", list(ARTIFACTS))
def test_a_damaged_artifact_is_refused_in_one_line_before_the_model_loads(copy, caplog, monkeypatch, kind, damage):
    run_dir, args = copy
    damage(run_dir / ARTIFACTS[kind])
    monkeypatch.setattr(ie, "load_model", None)  # calling it would be a traceback
    code, text, errors = run_main(args, caplog)
    assert one_line_refusal(code, text, errors, Path(ARTIFACTS[kind]).parts[0], "delete"), (text[-2000:], errors)


def test_missing_trial_rows_are_refused(copy, caplog):
    run_dir, args = copy
    lines = (run_dir / "trials.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "trials.jsonl").write_text("".join(lines[:3] + lines[5:]))  # two rows of the base model gone
    assert one_line_refusal(*run_main(args, caplog), "trials.jsonl[introspection/base]", "checksum")


@pytest.mark.parametrize("damage", [truncate, flip_bit], ids=["truncated", "bit-flipped"])
def test_damaged_stage_times_are_restored_from_the_manifest(complete, copy, caplog, damage):
    run_dir, args = copy
    original = json.loads((run_dir / "timings.json").read_text())
    damage(run_dir / "timings.json")
    code, text, _ = run_main(args, caplog)
    assert code == 0 and "rewritten from them" in text and "Trained" not in text

    def finished_stages(times):  # the model is loaded (and timed) again by every run
        return {k: v for k, v in times.items() if k != "load_model"}
    assert finished_stages(json.loads((run_dir / "timings.json").read_text())) == finished_stages(original)
    assert finished_stages(json.loads((run_dir / "metrics.json").read_text())["timings_s"]) == finished_stages(original)
    assert outputs(run_dir) == outputs(complete[0])


def test_a_recomputed_evaluation_keeps_its_place_in_the_trials():
    rows = lambda experiment, state, n: [{"experiment": experiment, "state": state, "i": i} for i in range(n)]  # noqa: E731
    trials = rows("introspection", "base", 2) + rows("introspection", "finetuned", 2) + rows("continue", "finetuned", 1)
    again = [{**t, "i": 10 + t["i"]} for t in rows("introspection", "finetuned", 2)]
    name = rundir.trials_part("introspection", "finetuned")
    assert rundir.replaced_part(trials, name, again) == trials[:2] + again + trials[4:]
    assert rundir.replaced_part(trials[:2], name, again) == trials[:2] + again  # a new evaluation goes last


def test_an_unrecorded_evaluation_is_recomputed_alone(complete, copy, caplog):
    """A run killed after writing an evaluation but before recording it: that evaluation alone runs again."""
    run_dir, args = copy
    manifest = json.loads((run_dir / "manifest.json").read_text())
    del manifest["artifacts"]["trials.jsonl[introspection/finetuned]"]
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = run_main(args, caplog)
    assert code == 0 and "trials.jsonl[introspection/finetuned] in" in text and "recomputing that stage" in text
    assert "Loaded adapter" in text and "Loaded introspection evaluation of base" in text
    assert outputs(run_dir) == outputs(complete[0])


def test_a_complete_run_resumes_entirely(complete, copy, caplog):
    run_dir, args = copy
    code, text, _ = run_main(args, caplog)
    assert code == 0 and "recomputing" not in text and "Trained" not in text
    assert outputs(run_dir) == outputs(complete[0])


def test_environment_json_keeps_the_environment_that_produced_the_run(copy, caplog):
    run_dir, args = copy
    path = run_dir / "environment.json"
    produced = json.loads(path.read_text())
    assert produced["processor"]["model"] and isinstance(produced["processor"]["isa"], list)
    assert produced["processor"]["torch_cpu_capability"]
    code, text, _ = run_main(args, caplog)  # the same environment: nothing written
    assert code == 0 and json.loads(path.read_text()) == produced and not (run_dir / "environment_resume.json").exists()
    elsewhere = {**produced, "processor": {**produced["processor"], "model": "Another CPU", "isa": []}}
    path.write_text(json.dumps(elsewhere))
    code, text, _ = run_main(args, caplog)
    assert code == 0 and json.loads(path.read_text()) == elsewhere  # the producing environment is kept
    assert json.loads((run_dir / "environment_resume.json").read_text()) == produced
    assert "another environment" in text and "processor" in text


# --- completion mark; Ctrl-C -----------------------------------------------------------------------------------------

def test_an_interrupted_run_is_partial_and_refused_by_its_readers(copy, caplog, monkeypatch):
    run_dir, args = copy

    def interrupted(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(report, "plot_figures", interrupted)  # Ctrl-C while the figures are drawn
        code, text, errors = run_main(args, caplog)
    assert code == 130 and len(errors) == 1 and "the same command resumes" in errors[0] and "Traceback" not in text
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "partial" and "adapter" in metrics["stages_done"]
    tables = load_paper_tables()
    monkeypatch.setattr(tables, "PAPER_DIR", run_dir / "paper")
    assert one_line_refusal(*run_main([str(run_dir)], caplog, tables.main), "did not finish", "partial")
    assert not (run_dir / "paper").exists()
    cfg = ie.resolve_config(ie.config_from_args(args))
    assert rundir.finished_metrics(run_dir, cfg) is None  # the study resumes it
    code, text, _ = run_main(args, caplog)  # nothing was lost: the rerun only writes the results
    assert code == 0 and "Trained" not in text and "recomputing" not in text
    assert rundir.finished_metrics(run_dir, cfg)["status"] == "complete"


# The script, run as `python -c` with the test's flags, that signals itself at the first training step: exactly
# mid-training whatever the machine's speed (a timed signal arrived after training on a fast machine).
SIGNAL_AT_FIRST_TRAINING_STEP = """
import os, sys
sys.path.insert(0, {root!r})
import introspection_experiment as ie
train_step = ie.forward_backward
def signalled(*args, **kwargs):
    os.kill(os.getpid(), {sig})
    return train_step(*args, **kwargs)
ie.forward_backward = signalled
sys.exit(ie.main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_signal_mid_training_then_rerun_gives_the_uninterrupted_results(complete, tmp_path, caplog, sig):
    args = complete[1][:-1] + [str(tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGNAL_AT_FIRST_TRAINING_STEP.format(root=str(ROOT), sig=int(sig)),
                           *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    output = proc.stdout
    manifest = tmp_path / "run" / "manifest.json"
    assert "Training LoRA" in output and "[introspection/base]" in manifest.read_text()
    assert "adapter" not in json.loads(manifest.read_text())["artifacts"], "signalled too late: training had finished"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "Traceback" not in output
        assert output.strip().splitlines()[-1].endswith("Interrupted: every finished stage is saved in the run "
                                                        "directory; the same command resumes")
    code, text, _ = run_main(args, caplog)
    assert code == 0 and "Loaded introspection evaluation of base" in text and "Trained" in text
    assert outputs(tmp_path / "run") == outputs(complete[0])
