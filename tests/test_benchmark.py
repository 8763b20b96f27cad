"""The committed GPU benchmark results: complete, labelled, and the README table generated from them."""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_benchmark as gb  # noqa: E402

STAGES = {"concept_vectors", "eval_introspection_base", "train", "eval_introspection_finetuned", "safety_vectors",
          "eval_safety_base", "eval_safety_probe", "safety_train", "eval_safety_safety_adapter"}
EXTRA = {"capability_base", "capability_finetuned"}  # timed, not part of the paper's workload


def results(names=("h100_bf16", "h100_4bit")):
    return [json.loads((ROOT / "benchmarks" / f"{name}.json").read_text()) for name in names]


def test_benchmarks_cover_every_stage_and_say_random_weights():
    for result in results():
        assert result["random_weights"] and result["model"] == "random:deepseek-llm-7b"
        assert {row["stage"] for row in result["stages"] if not gb.is_extra(row)} == STAGES
        assert {row["stage"] for row in result["stages"] if gb.is_extra(row)} == EXTRA
        assert abs(result["total_compute_s"] - sum(row["seconds"] for row in result["stages"] if not gb.is_extra(row))) < 1e-6
        assert abs(result["extra_s"] - sum(row["seconds"] for row in result["stages"] if gb.is_extra(row))) < 1e-6
        assert "RANDOM WEIGHTS" in gb.format_table(result)
    bf16, nf4 = results()
    assert not bf16["load_in_4bit"] and nf4["load_in_4bit"]
    assert [t["micro_batch"] for t in bf16["throughput"]] == [4, 32]


def test_readme_benchmark_table_matches_the_json():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- benchmark:start -->\n```\n(.*?)\n```\n<!-- benchmark:end -->", readme, re.S).group(1)
    runs = results(("h100_bf16", "h100_4bit", "h100_bf16_rerun"))
    assert block == "\n\n".join(gb.format_table(r) for r in runs) + "\n\n" + gb.targets_line(runs)


def test_targets_line_says_not_met_when_one_run_misses():
    runs = results(("h100_bf16", "h100_4bit", "h100_bf16_rerun"))
    slow = {**runs[2], "total_compute_s": 30.5}
    assert f"bf16 total s ≤ 30.0: {runs[0]['total_compute_s']:.1f}, 30.5 NOT met" in gb.targets_line([runs[0], runs[1], slow])
