#!/usr/bin/env python3
"""Trade-off study: what does keeping the assistant cost the introspection skill? Points of replay ratio x KL weight
x report-then-continue ratio (the pipeline's `--replay`, `--kl-weight`, `--continue-examples`; 0:0:0 is the paper's
recipe, `--recipe paper`, and every other point the default recipe's training, the joint loss at its learning rate,
with its own values) for two protocols, the paper's (prompt-end vectors) and word vectors with random negatives; every point is one
resumable `introspection_experiment.run` in its own run directory under --runs, one model load shared by all points,
and a finished point is read back without loading.

    python studies/tradeoff_study.py                            # the default points (default --model smollm2-135m)
    python studies/tradeoff_study.py --points 0:0:0 1:4:0 --protocols paper

Outputs go to --figures: tradeoff_study.png (seen success, held-out success, random-vector 'detection' and control
false positives against perplexity change and agreement with the base model, Wilson 95% CIs), tradeoff_study.json and
tradeoff_study.md (the table, with the capability goal checked point by point). Any other flag goes to the pipeline
(see introspection_experiment.py --help); the safety stage is skipped.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import introspection_experiment as ie  # noqa: E402
import machinery
from machinery import report, rundir
from generalization_study import Study, protocol_name, study_parser  # noqa: E402

log = logging.getLogger("study")
PROTOCOLS = {"paper": {}, "word-random-negatives": {"vector_token": "word", "random_negatives": 0.5}}
DEFAULT_POINTS = {"paper": ["0:0:0", "1:0:0", "1:4:0", "1:4:0:neg", "1:16:0", "1:4:0.5", "0.5:4:0.25", "0.5:4:0",
                            "0.5:8:0", "0.5:16:0"],
                  "word-random-negatives": ["0:0:0", "1:4:0", "0.5:4:0", "0.5:4:0.25"]}
DETECTION = [("seen", "success", "seen success"), ("held-out", "success", "held-out success"),
             ("random", "detection", "random-vector 'detection'"), ("control", "false_positive", "control false positives")]
CONTINUE = [("seen", "report", "continue: seen report"), ("seen", "correct_id", "continue: seen ID"),
            ("no-injection", "report", "continue: false reports"), ("no-injection", "agreement", "continue: agreement")]
GOAL = {  # issue #12's goal on the embedded model: (metric, comparison, bound)
    "perplexity change": ("<=", 0.05), "agreement with base": (">=", 0.75), "KL (nats/token)": ("<=", 0.05),
    "exact-answer change": (">=", -0.03), "template leak": ("<=", 0.01), "seen success": (">=", 0.90),
    "control false positives": ("<=", 0.0)}


def point_metrics(m: dict) -> dict:
    """The numbers one point contributes: detection rates (fine-tuned, all strengths) and capability costs."""
    ft, cap = m["results"]["finetuned"], m["capability"]
    out = {label: ft[split]["false_positive"] if split == "control" else ft[split]["all"][metric]
           for split, metric, label in DETECTION}
    out.update({"perplexity change": cap["perplexity_change"], "agreement with base": cap["agreement"],
                "KL (nats/token)": cap["answer_kl"]["mean_per_token"],
                "exact-answer change": cap["exact_answers"]["change"],
                "template leak": cap["template_leak"]["finetuned"]})
    cont = m.get("continue", {})  # report-then-continue: measured in every run (absent from runs of older versions)
    for split, metric, label in CONTINUE:
        out[label] = cont[split][metric] if split in cont else None
    return out


def value(x) -> float | None:
    return x["rate"] if isinstance(x, dict) else x


def goals_met(point: dict) -> list[str]:
    """Names of the goal's criteria this point meets (point estimates)."""
    met = []
    for name, (op, bound) in GOAL.items():
        v = value(point[name])
        if v is not None and (v >= bound if op == ">=" else v <= bound):
            met.append(name)
    return met


def parse_point(spec: str) -> dict:
    """'1:4:0.5' -> replay 1, KL weight 4, continue ratio 0.5; a trailing ':neg' also puts the negatives' completions
    under the KL term (--kl-negatives)."""
    parts = spec.split(":")
    try:
        replay, kl, cont = (float(x) for x in parts[:3])
    except ValueError:
        raise machinery.ConfigError(f"bad point {spec!r}: use REPLAY:KL:CONTINUE, e.g. 1:4:0.5 (add :neg for --kl-negatives)") from None
    if len(parts) not in (3, 4) or parts[3:] not in ([], ["neg"]):
        raise machinery.ConfigError(f"bad point {spec!r}: use REPLAY:KL:CONTINUE, e.g. 1:4:0.5 (add :neg for --kl-negatives)")
    return {"replay": replay, "kl_weight": kl, "continue_examples": cont, "kl_negatives": parts[3:] == ["neg"]}


def sweep(study: Study, args) -> dict:
    rows = []
    for protocol, spec in [(p, s) for p in args.protocols for s in args.points[p]]:
        point = parse_point(spec)
        paper = not (point["replay"] or point["kl_weight"] or point["continue_examples"])  # 0:0:0 is --recipe paper
        m = study.run(f"tradeoff/{protocol}-{spec.replace(':', '_')}", **point, **PROTOCOLS[protocol],
                      **({"recipe": "paper"} if paper else {}))
        numbers = point_metrics(m)
        rows.append({"protocol": protocol_name(m["settings"]["vector_token"], PROTOCOLS[protocol].get("random_negatives", 0)),
                     **point, **numbers, "goals_met": goals_met(numbers)})
    result = {**study.describe(), "goal": {k: list(v) for k, v in GOAL.items()}, "points": rows}
    rundir.write_json(Path(args.figures) / "tradeoff_study.json", result)
    (Path(args.figures) / "tradeoff_study.md").write_text(tradeoff_table(result))
    plot_tradeoff(result, Path(args.figures) / "tradeoff_study.png")
    return result


def fmt(name: str, x) -> str:
    if isinstance(x, dict):
        return report.pct(x)
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}%" if name == "perplexity change" else (
        f"{100 * x:+.1f} pp" if name == "exact-answer change" else f"{x:.3f}")


def tradeoff_table(result: dict) -> str:
    """Markdown: one row per point, every detection rate and capability cost, and how many goal criteria it meets."""
    names = ([label for _, _, label in DETECTION] + [n for n in GOAL if n not in {lab for _, _, lab in DETECTION}]
             + [label for _, _, label in CONTINUE])
    header = ["protocol", "replay", "KL weight", "continue", *names, f"goal criteria met (of {len(GOAL)})"]
    rows = [[p["protocol"], f"{p['replay']:g}", f"{p['kl_weight']:g}" + (" (+neg.)" if p["kl_negatives"] else ""),
             f"{p['continue_examples']:g}", *(fmt(n, p[n]) for n in names),
             str(len(p["goals_met"])) + (" (all)" if len(p["goals_met"]) == len(GOAL) else "")]
            for p in result["points"]]
    recipe = ":".join(f"{ie.RECIPES['assistant'][k]:g}" for k in ("replay", "kl_weight", "continue_examples"))
    intro = (f"Model: {result['model']} on {', '.join(result['hardware'])}; seed {result['seed']}; the pipeline's default "
             f"recipe (--recipe assistant) is the point {recipe}, the paper's (--recipe paper) 0:0:0; fine-tuned model, "
             "all strengths pooled (Wilson 95% CIs); capability on the held-out ordinary prompts, no injection. Goal: "
             + ", ".join(f"{n} {op} {b:g}" for n, (op, b) in GOAL.items()) + ".")
    return intro + "\n\n" + report.markdown_table(header, rows)


def plot_tradeoff(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [("perplexity change", "prose perplexity change (%)"), ("agreement with base", "agreement with base (%)")]
    fig, axes = plt.subplots(len(xs), len(DETECTION), figsize=(4.0 * len(DETECTION), 3.6 * len(xs)), squeeze=False)
    protocols = list(dict.fromkeys(p["protocol"] for p in result["points"]))
    weights = sorted({p["kl_weight"] for p in result["points"]})
    markers = dict(zip(weights, "osD^v<>"))
    for r, (xname, xlabel) in enumerate(xs):
        for c, (_, _, yname) in enumerate(DETECTION):
            ax = axes[r][c]
            for i, protocol in enumerate(protocols):
                for w in weights:
                    pts = [p for p in result["points"] if p["protocol"] == protocol and p["kl_weight"] == w]
                    if not pts:
                        continue
                    x = [100 * value(p[xname]) for p in pts]
                    ys = [p[yname] for p in pts]
                    xerr = report.ci_err([p[xname] for p in pts]) * 100 if isinstance(pts[0][xname], dict) else None
                    ax.errorbar(x, [100 * y["rate"] for y in ys], yerr=report.ci_err(ys) * 100, xerr=xerr, fmt=markers[w],
                                color=f"C{i}", capsize=2, label=f"{protocol}, KL {w:g}")
                    for xv, p, y in zip(x, pts, ys):
                        ax.annotate(f"r{p['replay']:g}" + (f" c{p['continue_examples']:g}" if p["continue_examples"] else "")
                                    + (" neg" if p["kl_negatives"] else ""), (xv, 100 * y["rate"]), fontsize=6, xytext=(3, 3),
                                    textcoords="offset points")
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(f"{yname} (%)", fontsize=8)
            ax.set_ylim(-3, 103)
            if xname == "perplexity change":
                ax.set_xscale("symlog", linthresh=10)
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(f"Introspection vs capability — {result['model']} on {', '.join(result['hardware'])} "
                 f"(labels: replay ratio r, continue ratio c, neg = negatives under KL; seed {result['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = study_parser(__doc__)
    parser.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS))
    parser.add_argument("--points", nargs="+", default=None, help=(
        "REPLAY:KL:CONTINUE points (':neg' appended: the negatives under the KL term too); default: "
        f"{' '.join(DEFAULT_POINTS['paper'])} for the paper protocol, {' '.join(DEFAULT_POINTS['word-random-negatives'])} "
        "for word vectors + random negatives"))
    return parser


def main(argv=None) -> int:
    def action():
        args, pipeline_args = build_parser().parse_known_args(argv)
        args.points = {p: args.points or DEFAULT_POINTS[p] for p in args.protocols}
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        log.info("Trade-off table:\n%s", tradeoff_table(sweep(Study(args, pipeline_args), args)))

    return machinery.cli(action)  # the pipeline's logging; bad input one line and exit 2, Ctrl-C exit 130


if __name__ == "__main__":
    sys.exit(main())
