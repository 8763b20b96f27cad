"""Stage 9, results: the one markdown table writer and the CSV rows."""
import json

import introspection_experiment as ie
from conftest import ROOT


def test_markdown_table_layout():
    assert ie.markdown_table(["a", "b c"], [[1, "x"], ["", None]]) == "| a | b c |\n|---|---|\n| 1 | x |\n|  | None |\n"
    assert ie.markdown_table(["only"], []) == "| only |\n|---|\n"


def test_metrics_csv_rows_carry_every_rate_with_its_interval():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    header, *rows = ie.metrics_csv_rows(metrics)
    assert header == ["state", "split", "strength", "metric", "k", "n", "rate", "ci_low", "ci_high"]
    ft = metrics["results"]["finetuned"]["held-out"]["all"]["success"]
    assert ["finetuned", "held-out", "all", "success", ft["k"], ft["n"], ft["rate"], *ft["ci95"]] in rows
    assert {r[0] for r in rows} >= {"base", "finetuned", "safety:base", "safety:probe", "safety:safety_adapter"}
