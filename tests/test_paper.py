"""paper/tables.py: the paper's published numbers, and its command line."""
import re

import introspection_experiment as ie
from conftest import ROOT, load_paper_tables

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


def test_the_pipeline_never_imports_the_report():
    """Dependencies run one way: paper/tables.py reads a run and borrows the pipeline's helpers, never the reverse;
    the pipeline reads no benchmark or study file."""
    source = (ROOT / "introspection_experiment.py").read_text()
    assert "paper" not in re.findall(r"^(?:import|from) (\S+)", source, re.M)
    assert not re.search(r"benchmarks|scaling_study|\\begin\{|tabular", source)
