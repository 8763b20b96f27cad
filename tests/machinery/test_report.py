"""machinery.report and progress: tables, CSV rows and the progress lines of long stages."""
import json
import logging

import introspection_experiment as ie
import machinery
from machinery import report
from conftest import ROOT


def test_markdown_table_layout():
    assert report.markdown_table(["a", "b c"], [[1, "x"], ["", None]]) == "| a | b c |\n|---|---|\n| 1 | x |\n|  | None |\n"
    assert report.markdown_table(["only"], []) == "| only |\n|---|\n"


def test_metrics_csv_rows_carry_every_rate_with_its_interval():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    header, *rows = report.metrics_csv_rows(metrics)
    assert header == ["state", "split", "strength", "metric", "k", "n", "rate", "ci_low", "ci_high"]
    ft = metrics["results"]["finetuned"]["held-out"]["all"]["success"]
    assert ["finetuned", "held-out", "all", "success", ft["k"], ft["n"], ft["rate"], *ft["ci95"]] in rows
    assert {r[0] for r in rows} >= {"base", "finetuned", "safety:base", "safety:probe", "safety:safety_adapter"}


def progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.getMessage().startswith("work:")]


def test_a_loop_off_the_terminal_logs_every_tenth(caplog):
    caplog.clear()
    assert list(machinery.progress(range(25), "work")) == list(range(25))  # pytest's stderr is not a terminal: tqdm is off
    lines = progress_lines(caplog)
    assert lines[0].startswith("work: 3/25 (12%)") and lines[-1].startswith("work: 25/25 (100%)")
    assert len(lines) == 10


def test_a_slow_loop_logs_at_least_every_interval(caplog, monkeypatch):
    clock = iter(range(0, 10_000, 40))  # 40 s per step
    monkeypatch.setattr(ie.time, "monotonic", lambda: next(clock))
    caplog.clear()
    bar = machinery.Progress(1000, "work", every_s=30)
    for _ in range(3):
        bar.update()
    bar.close()
    assert [line.split(" after ")[0] for line in progress_lines(caplog)] == ["work: 1/1000 (0%)", "work: 2/1000 (0%)",
                                                                             "work: 3/1000 (0%)"]


def test_the_stages_log_their_start_with_counts(tiny, tok, caplog):
    cfg = ie.Config(layer=2, max_new_tokens=2, control_trials=2, random_vectors=1, eval_batch_size=4)
    concepts = {"train": ["fire", "ocean"], "heldout": ["volcano"], "baseline": ["table", "chair"]}
    vectors, _, _ = ie.extract_concept_vectors(tiny, tok, concepts, 2, cfg)
    assert "Reading layer-2 activations of 5 prompts (paper format, prompt-end token)" in caplog.text
    randoms = ie.random_directions(1, tiny.config.hidden_size, 0)
    spec = ie.build_trials(concepts, ["1x"], list(randoms), cfg)
    ie.run_trials(tiny, tok, spec, {**vectors, **randoms, "-volcano": -vectors["volcano"]}, 1.0, cfg, "base")
    distractor = sum(t["split"] == "distractor" for t in spec)  # 3 injected + no injection with 'fire', 'ocean' named
    assert distractor == 3 + 2
    batches = -(-(len(spec) - 2 - 1 - distractor) // 4) + 1 + -(-(1 + distractor) // 4)  # greedy, sampled, matched + distractor
    assert f"Evaluating introspection on the base model: {len(spec)} trials in {batches} batches" in caplog.text
    assert "eval introspection base: " in caplog.text
