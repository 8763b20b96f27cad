"""benchmarks/gpu_benchmark.py: the targets line."""
import sys

from conftest import ROOT, benchmark_results

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_benchmark as gb  # noqa: E402


def test_targets_line_says_not_met_when_one_run_misses():
    runs = benchmark_results(("h100_bf16", "h100_4bit", "h100_bf16_rerun"))
    slow = {**runs[2], "total_compute_s": 30.5}
    assert f"bf16 total s ≤ 30.0: {runs[0]['total_compute_s']:.1f}, 30.5 NOT met" in gb.targets_line([runs[0], runs[1], slow])
