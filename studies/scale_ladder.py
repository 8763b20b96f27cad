#!/usr/bin/env python3
"""Scale ladder: the default pipeline and the key protocols on every real model the project can install, against
model size. One command, resumable (each point is one `introspection_experiment.run` in its own run directory under
--runs; a finished point is read back without loading its model; one model is in memory at a time):

    python studies/scale_ladder.py                                    # all four aliases, both protocols
    python studies/scale_ladder.py --models smollm2-135m gemma3-270m  # a subset

Protocols: `paper` (the paper's prompt-end vectors, norm-multiple strengths: the default pipeline) and
`word-random` (vectors read at the concept word's token, half the negatives carrying a norm-matched random
direction). Base models without a chat template run in the paper prompt format like every model here. Any other flag
goes to the pipeline (introspection_experiment.py --help), e.g. `--skip-safety` is always set here. Outputs go to
--figures: scale_ladder.{png,json,md}: held-out identification, random-vector detection, matched false positive,
agreement with the base model's answers and perplexity change of the fine-tuned model against the number of weights in
matrix products, with Wilson 95% CIs; the table adds seen success, the sampled controls' false positives, KL to the
base, the exact-answer change, the hardware and the wall time (the run's stages, model loading excluded).
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import introspection_experiment as ie  # noqa: E402
import machinery
from machinery import models, report, rundir
from generalization_study import Study, study_parser  # noqa: E402

log = logging.getLogger("ladder")
MODELS = ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"]
PROTOCOLS = {"paper": dict(vector_token="prompt-end", random_negatives=0.0),
             "word-random": dict(vector_token="word", random_negatives=0.5)}
RATES = [("seen success", ("seen", "all", "success")),  # the table's rate columns, in order
         ("held-out identification", ("held-out", "all", "success")),
         ("random-vector 'detection'", ("random", "all", "detection")),
         ("matched false positive", ("matched_control", "false_positive")),
         ("sampled control false positive", ("control", "false_positive"))]
PANELS = ["held-out identification", "random-vector 'detection'", "matched false positive", "agreement with base"]


def dig(tree: dict, keys: tuple):
    """The value at a path of keys in nested dicts."""
    for key in keys:
        tree = tree[key]
    return tree


def point(metrics: dict, model: str, protocol: str, hardware: str) -> dict:
    """The ladder's numbers of one finished run: rates of the fine-tuned model and its capability cost."""
    result, capability = metrics["results"]["finetuned"], metrics["capability"]
    return {"model": model, "protocol": protocol, "label": report.model_label(metrics["model"]), "hardware": hardware,
            "matmul_weights": metrics["model"]["matmul_weights"], "random_weights": metrics["model"]["random_weights"],
            **{name: dig(result, keys) for name, keys in RATES},
            "perplexity change": capability["perplexity_change"], "agreement with base": capability["agreement"],
            "answer KL": capability["answer_kl"]["mean_per_token"],
            "exact-answer change": capability["exact_answers"]["change"],
            "wall_s": round(sum(v for k, v in metrics["timings_s"].items() if not k.endswith("_peak_gib")), 1)}


def ladder(args, pipeline_args: list[str]) -> dict:
    """Every (model, protocol) point, run or read back; one model loaded at a time."""
    points = []
    for model in args.models:
        study = Study(args, ["--model", model, "--skip-safety", *pipeline_args])
        for protocol in args.protocols:
            log.info("Ladder point %s / %s", model, protocol)
            metrics = study.run(f"{rundir.model_slug(model)}/{protocol}", **PROTOCOLS[protocol])
            points.append(point(metrics, model, protocol, study.last_hardware))
        del study  # the model's memory goes before the next one loads
    return {"points": points, "protocols": {p: PROTOCOLS[p] for p in args.protocols},
            "pipeline_args": pipeline_args, "command": "python studies/scale_ladder.py " + " ".join(sys.argv[1:])}


def table(result: dict) -> str:
    """Markdown: one row per point; rates of the fine-tuned model (all strengths) with Wilson 95% CIs."""
    names = [name for name, _ in RATES]
    header = ["model", "protocol", "weights (matmul)", *names, "perplexity change", "agreement with base",
              "KL (nats/token)", "exact answers", "hardware", "wall time"]
    rows = [[p["label"] + " (RANDOM WEIGHTS)" * p["random_weights"], p["protocol"], f"{p['matmul_weights'] / 1e6:.0f}M",
             *(report.pct(p[n]) for n in names), f"{100 * p['perplexity change']:+.0f}%", report.pct(p["agreement with base"]),
             f"{p['answer KL']:.3f}", f"{100 * p['exact-answer change']:+.1f} pp", p["hardware"],
             f"{p['wall_s'] / 60:.1f} min"] for p in result["points"]]
    return report.markdown_table(header, rows)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PANELS) + 1, figsize=(4 * (len(PANELS) + 1), 4.2))
    for protocol in result["protocols"]:
        pts = sorted((p for p in result["points"] if p["protocol"] == protocol), key=lambda p: p["matmul_weights"])
        xs = [p["matmul_weights"] for p in pts]
        for ax, name in zip(axes, PANELS):
            rates = [p[name] for p in pts]
            ax.errorbar(xs, [r["rate"] for r in rates], yerr=report.ci_err(rates), marker="o", capsize=3, label=protocol)
        axes[-1].plot(xs, [100 * p["perplexity change"] for p in pts], marker="o", label=protocol)
    sizes = {p["matmul_weights"]: f"{p['label']}\n{p['matmul_weights'] / 1e6:.0f}M" for p in result["points"]}
    for ax, name in zip(axes, PANELS + ["perplexity change (%)"]):
        ax.set_xscale("log")
        ax.set_xticks(list(sizes), list(sizes.values()), fontsize=6, rotation=35, ha="right")
        ax.minorticks_off()
        ax.set_xlabel("weights in matrix products")
        ax.set_title(name, fontsize=10)
    for ax in axes[:-1]:
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("rate (fine-tuned, all strengths; 95% Wilson CI)")
    axes[-1].axhline(0, color="grey", lw=0.5)
    axes[-1].legend(fontsize=8)
    random = any(p["random_weights"] for p in result["points"])
    hardware = ", ".join(sorted({p["hardware"] for p in result["points"]}))
    fig.suptitle(f"Scale ladder{' (RANDOM WEIGHTS)' * random} — {hardware}; matched false positive: one greedy "
                 "trial on the evaluation prompt per point", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = study_parser(__doc__, runs="runs/ladder", figures="where scale_ladder.{png,json,md} go")
    parser.add_argument("--models", nargs="+", default=MODELS, help="aliases (or any --model value)")
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    return parser


def main(argv=None) -> int:
    def action():
        args, pipeline_args = build_parser().parse_known_args(argv)
        for model in args.models:  # a missing package stops the ladder before any point runs
            models.check_model_available(model)
        result = ladder(args, pipeline_args)
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
        rundir.write_json(figures / "scale_ladder.json", result)
        (figures / "scale_ladder.md").write_text(table(result))
        plot(result, figures / "scale_ladder.png")
        log.info("Scale ladder:\n%s", table(result))

    return machinery.cli(action)  # the pipeline's logging; bad input one line and exit 2, Ctrl-C exit 130


if __name__ == "__main__":
    sys.exit(main())
