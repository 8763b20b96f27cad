"""The whole pipeline on a tiny random model (and, with --runslow, the embedded model): artifacts, resume, seeds."""
import json

import pytest

import introspection_experiment as ie
from machinery import models, rundir
from conftest import TINY_ARGS, concepts_file, run_main


def test_end_to_end_tiny_and_resume(tmp_path, caplog):
    out = tmp_path / "run"
    args = TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--output-dir", str(out)]
    code, text = run_main(args, caplog)
    assert code == 0, text
    for name in ("config.json", "environment.json", "vectors.safetensors", "dataset", "adapter/adapter_config.json",
                 "trials.jsonl", "metrics.json", "metrics.csv", "results.md", "adapter_train_log.json",
                 "figures/generalization_gap.png", "figures/strength_curves.png", "figures/outcome_breakdown.png",
                 "figures/concept_heatmap.png", "figures/training_loss.png", "safety_vectors.safetensors",
                 "safety_dataset", "safety_adapter/adapter_config.json", "figures/safety_halt_rates.png",
                 "figures/safety_confusion.png"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["random_weights"] and "RANDOM WEIGHTS" in (out / "results.md").read_text()
    assert set(metrics["results"]) == {"base", "finetuned"}
    trials = rundir.read_jsonl(out / "trials.jsonl")
    # seen, held-out, controls, the matched control, random, negated held-out vectors, yes/no questions without and
    # with injection at each of the 2 strengths, and the wrong-concept control: the 6 concepts at one strength, then
    # one no-injection trial per distinct distractor named
    echoes = len({t["distractor"] for t in trials if t["split"] == "distractor"})
    assert 2 + 2 <= echoes <= 2 + 4  # volcano and galaxy name each other; 2-4 distinct among the 4 seen concepts
    per_state = 4 * 2 + 2 * 2 + 4 + 1 + 2 * 2 + 2 * 2 + len(ie.YES_NO_QUESTIONS) * 3 + 6 + echoes
    assert sum(t["experiment"] == "introspection" for t in trials) == 2 * per_state
    n_safety = sum(map(len, ie.SAFETY_CATEGORIES.values())) * 2 * len(ie.SAFETY_EVAL_QUESTIONS) + 4
    assert sum(t["experiment"] == "safety" for t in trials) == 3 * n_safety  # base, probe, safety adapter
    assert set(metrics["safety"]["results"]) == {"base", "probe", "safety_adapter"}
    assert metrics["results"]["finetuned"]["seen"]["1x"]["success"]["n"] == 4
    # report-then-continue is measured in every run, trained for or not (this one is not)
    assert metrics["settings"]["language_modelling"]["continue_rows"] == 0
    assert set(metrics["continue"]) == set(ie.CONTINUE_SPLITS)
    assert sum(t["experiment"] == "continue" for t in trials) == len(ie.ordinary_prompts()["heldout"])
    # safety in ordinary use: both monitors on the first held-out ordinary prompts
    ordinary = [t for t in trials if t["experiment"] == "safety_ordinary"]
    assert [sum(t["state"] == s for t in ordinary) for s in ("probe", "safety_adapter")] == [ie.ORDINARY_SAFETY_PROMPTS] * 2
    use = metrics["safety"]["ordinary_use"]
    assert set(use) == {"probe", "safety_adapter"} and use["safety_adapter"]["false_halt"]["n"] == 48
    assert "agreement_proceeding" in use["safety_adapter"]["no-injection"] and "agreement_proceeding" not in use["probe"]["safe"]
    assert "Safety in ordinary use" in (out / "results.md").read_text()
    vectors, meta = rundir.load_vectors(out / "vectors.safetensors")
    assert meta["layer"] == 2 and all(abs(float(v.norm()) - 1) < 1e-4 for v in vectors.values())

    adapter_mtime = (out / "adapter" / "adapter_config.json").stat().st_mtime
    code, text = run_main(args, caplog)
    assert code == 0 and "Loaded adapter" in text and "Loaded introspection evaluation of base" in text
    assert "Loaded safety evaluation of safety_adapter" in text and "Trained" not in text
    assert "Loaded safety_ordinary evaluation of safety_adapter" in text and "Loaded continue evaluation" in text
    assert (out / "adapter" / "adapter_config.json").stat().st_mtime == adapter_mtime
    assert rundir.read_jsonl(out / "trials.jsonl") == trials

    code, text = run_main(args[:-2] + ["--seed", "1", "--output-dir", str(out)], caplog)
    assert code == 2 and "different config (seed)" in text


def test_adapters_load_with_peft_and_skip_safety(tmp_path, caplog, tok):
    from peft import PeftModel
    out = tmp_path / "run"
    assert run_main(TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--output-dir", str(out)], caplog)[0] == 0
    for name in ("adapter", "safety_adapter"):
        model = models.load_model(ie.Config(model="random:tiny", dtype="float32"))[0]
        assert isinstance(PeftModel.from_pretrained(model, str(out / name)), PeftModel)
    skipped = tmp_path / "skipped"
    assert run_main(TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--output-dir", str(skipped),
                                 "--skip-safety"], caplog)[0] == 0
    assert "safety" not in json.loads((skipped / "metrics.json").read_text())


@pytest.mark.slow
def test_end_to_end_embedded_model(tmp_path, caplog):
    """The embedded model end to end with the paper's recipe, asserting what the pipeline guarantees on any CPU (bf16
    kernels, and so every sampled token, differ between processors): it runs and resumes, its numbers are those of
    its trials, training lowers the loss, and the fine-tuned model answers in the trained format."""
    concepts = {"train": ["fire", "ocean", "king", "storm", "spider", "gold"], "heldout": ["volcano", "galaxy"],
                "baseline": ie.BASELINE_WORDS[:8]}
    out = tmp_path / "run"
    args = ["--model", models.EMBEDDED_MODEL, "--concepts-file", concepts_file(tmp_path, concepts), "--epochs", "2",
            "--positives-per-concept", "16", "--max-new-tokens", "12", "--control-trials", "12", "--random-vectors", "2",
            "--eval-strengths", "1x", "--skip-safety", "--recipe", "paper", "--output-dir", str(out)]
    code, text = run_main(args, caplog)
    assert code == 0, text
    metrics = json.loads((out / "metrics.json").read_text())
    assert not metrics["model"]["random_weights"] and metrics["settings"]["layer"] == 20
    assert metrics["settings"]["typical_norm"] > 10  # a real model's residual stream, not random init
    trials = rundir.read_jsonl(out / "trials.jsonl")
    introspection = [t for t in trials if t["experiment"] == "introspection"]
    assert ie.summarize(introspection, metrics["settings"]["eval_strengths"]) == metrics["results"]
    losses = json.loads((out / "adapter_train_log.json").read_text())
    epoch_means = [sum(l["loss"] for l in losses if l["epoch"] == e) / sum(l["epoch"] == e for l in losses)
                   for e in (0, 1)]
    assert epoch_means[1] < epoch_means[0]
    finetuned = [t for t in introspection if t["state"] == "finetuned" and t["split"] != "yes-no"]
    template = [t for t in finetuned if t["response"].lstrip().startswith(("I detect an injected thought",
                                                                          "I do not detect"))]
    assert len(template) >= 0.9 * len(finetuned)  # the task format was learned
    code, text = run_main(args, caplog)
    assert code == 0 and "Loaded adapter" in text and "Trained" not in text
    assert rundir.read_jsonl(out / "trials.jsonl") == trials


def test_seeds_run_each_seed_and_report_mean_and_sd(tmp_path, caplog):
    out = tmp_path / "seeds"
    args = TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--skip-safety", "--seeds", "0", "1",
                        "--output-dir", str(out)]
    code, text = run_main(args, caplog)
    assert code == 0, text
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["config"]["seeds"] is None
    for seed in (0, 1):
        metrics = json.loads((out / f"seed-{seed}" / "metrics.json").read_text())
        assert metrics["settings"]["seed"] == seed
        assert summary["metrics"]["seen success"]["values"][str(seed)] == ie.headline(metrics)["seen success"]
    fp = summary["metrics"]["control false positives"]
    values = list(fp["values"].values())
    assert fp["mean"] == pytest.approx(sum(values) / 2) and fp["sd"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "| perplexity change |" in (out / "seeds.md").read_text()
