"""benchmarks/gpu_benchmark.py: the targets line, the split note."""
import sys

from conftest import ROOT, benchmark_results

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_benchmark as gb  # noqa: E402


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
    ie.to_dataset(answers).save_to_disk(str(tmp_path / "replay_answers"))
    (tmp_path / "metrics.json").write_text(json.dumps({"concepts": {"train": ["fire", "ocean"]}}))
    cfg = ie.resolve_config(ie.Config(model="random:tiny", replay=3 / 8, continue_examples=2 / 8))  # of 8 examples
    examples = gb.trained_examples(tmp_path, cfg, tok, "train")
    assert len(examples) == 8 + 3 + 2 and sum(e["kl"] for e in examples) == 3 + 1  # the uninjected continue row
    assert [e["completion"] for e in examples if e["kl"]] == [[5, 6, tok.eos_token_id]] * 4
    assert [e["concept"] for e in examples[-2:]] == ["fire", ""]  # the injected continue row: a training concept
