#!/usr/bin/env python3
"""Generalisation study: can the model name concepts it never saw, and is that introspection or any-perturbation
detection? Three parts, each one command; every point is one `introspection_experiment.run` (its own resumable run
directory under --runs, one model load shared by all points):

    python studies/generalization_study.py scaling    # held-out identification and random-vector detection vs N
    python studies/generalization_study.py sweep      # layer x strength grid (detection, identification)
    python studies/generalization_study.py controls   # the full controls battery for the main protocols
    python studies/generalization_study.py summary    # the goal verdict from the scaling study's JSON

scaling and sweep use the cheap logprob scoring (one teacher-forced pass per trial, the same verdicts as greedy
generation); controls uses free generation, so that the yes/no questions and sampled controls are included. Any
other flag goes to the pipeline (see introspection_experiment.py --help; default --model smollm2-135m).
Outputs go to --figures: scaling_study.{png,json}, layer_strength_heatmap.{png,json}, controls_table.{md,json},
study_summary.md.
Each part's single default point (N=40, prompt-end vectors, no random negatives, layer 20) is the default pipeline
protocol and runs on a CPU, e.g. `scaling --points 40 --vector-tokens prompt-end --random-negatives 0`.
"""
import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import introspection_experiment as ie  # noqa: E402
import machinery
from machinery import models, report, rundir

log = logging.getLogger("study")
SWEEP_STRENGTHS = ["0.25x", "0.5x", "1x", "1.5x", "2x", "3x", "4x"]
SCALING_METRICS = [("held-out", "success", "held-out identification"), ("random", "detection", "random-vector 'detection'"),
                   ("seen", "success", "seen identification"), ("control", "false_positive", "control false positives")]
SWEEP_METRICS = [("held-out", "detection", "held-out detection"), ("held-out", "success", "held-out identification"),
                 ("seen", "success", "seen identification"), ("random", "detection", "random-vector 'detection'")]


def finetuned_rate(metrics: dict, split: str, metric: str, strength: str = "all") -> dict:
    result = metrics["results"]["finetuned"]
    return result["control"]["false_positive"] if split == "control" else result[split][strength][metric]


def protocol_name(vector_token: str, random_negatives: float) -> str:
    return f"{vector_token} vectors" + (f", {random_negatives:g} random negatives" if random_negatives else "")


def hardware_of(run_dir: Path) -> str:
    """The GPU a finished run used, from its environment.json, or 'CPU'."""
    return json.loads((run_dir / "environment.json").read_text())["gpu"] or "CPU"


class Study:
    """Runs points of the study with one shared model (loaded on first need); each point is resumable in its own
    directory, and a finished point (a complete run of the same config and inputs) is read back without loading
    anything."""

    def __init__(self, args, pipeline_args: list[str]):
        self.args, self.loaded, self.hardware = args, None, set()
        if "--model" not in pipeline_args:
            pipeline_args = ["--model", models.EMBEDDED_MODEL, *pipeline_args]
        self.base = dataclasses.replace(ie.config_from_args(pipeline_args), skip_safety=True)

    def run(self, name: str, **overrides) -> dict:
        cfg = dataclasses.replace(self.base, output_dir=str(Path(self.args.runs) / name), **overrides)
        cfg = ie.resolve_config(cfg)
        metrics = rundir.finished_metrics(Path(cfg.output_dir), cfg)  # a complete point; a partial one resumes
        if metrics is None:
            self.loaded = self.loaded or models.load_model(cfg)
            metrics = ie.run(cfg, self.loaded)
        self.metrics = metrics
        self.last_hardware = hardware_of(Path(cfg.output_dir))
        self.hardware.add(self.last_hardware)
        return metrics

    def describe(self) -> dict:
        """Model, hardware and seed of the points, for the figure titles and JSON."""
        return {"model": report.figure_label(self.metrics), "hardware": sorted(self.hardware), "seed": self.base.seed}


def scaling(study: Study, args) -> dict:
    """Held-out identification and random-vector detection (all strengths pooled) vs the number of training concepts,
    for each vector token x random-negative fraction."""
    curves = []
    for token in args.vector_tokens:
        for fraction in args.random_negatives:
            points = []
            for n in args.points:
                m = study.run(f"scaling/{token}-rn{fraction:g}-n{n}", num_train_concepts=n, vector_token=token,
                              random_negatives=fraction, scoring="logprob")
                points.append({"num_train_concepts": n, **{label: finetuned_rate(m, split, metric)
                                                           for split, metric, label in SCALING_METRICS}})
            curves.append({"vector_token": token, "random_negatives": fraction,
                           "name": protocol_name(token, fraction), "points": points})
    result = {**study.describe(), "scoring": "logprob", "curves": curves}
    plot_scaling(result, Path(args.figures) / "scaling_study.png")
    rundir.write_json(Path(args.figures) / "scaling_study.json", result)
    return result


def sweep(study: Study, args) -> dict:
    """A layer x evaluation-strength grid: one adapter trained per layer (the default training strengths), scored
    over a wider range of strengths, for each vector token."""
    grids = []
    for token in args.vector_tokens:
        rows = []
        for layer in args.layers:
            m = study.run(f"sweep/{token}-layer{layer}", layer=layer, vector_token=token, eval_strengths=args.strengths,
                          scoring="logprob")
            rows.append({"layer": layer, "alphas": m["settings"]["alphas"],
                         **{label: [finetuned_rate(m, split, metric, s) for s in args.strengths]
                            for split, metric, label in SWEEP_METRICS}})
        grids.append({"vector_token": token, "rows": rows})
    result = {**study.describe(), "scoring": "logprob", "strengths": args.strengths, "layers": args.layers,
              "grids": grids}
    plot_sweep(result, Path(args.figures) / "layer_strength_heatmap.png")
    rundir.write_json(Path(args.figures) / "layer_strength_heatmap.json", result)
    return result


CONTROL_PROTOCOLS = [  # (run name, overrides): the paper's protocol first
    ("paper", {}),
    ("random-negatives", {"random_negatives": 0.5}),
    ("word", {"vector_token": "word"}),
    ("word-random-negatives", {"vector_token": "word", "random_negatives": 0.5}),
]


def controls(study: Study, args) -> dict:
    """The full controls battery (free generation) for the main protocols, at N = args.points (one or more)."""
    rows = []
    for n in args.points:
        for name, overrides in CONTROL_PROTOCOLS:
            m = study.run(f"controls/{name}-n{n}", num_train_concepts=n, **overrides)
            rows.append({"protocol": protocol_name(m["settings"]["vector_token"], overrides.get("random_negatives", 0)),
                         "num_train_concepts": n, "results": m["results"]})
    result = {**study.describe(), "scoring": "generate", "rows": rows}
    rundir.write_json(Path(args.figures) / "controls_table.json", result)
    (Path(args.figures) / "controls_table.md").write_text(controls_table(result))
    return result


def controls_table(result: dict) -> str:
    """Markdown: for each protocol, base and fine-tuned rates of success and of every control (Wilson 95% CI)."""
    intro = (f"Model: {result['model']} on {', '.join(result['hardware'])}; free generation; all strengths pooled; "
             f"seed {result['seed']}.")
    rows = []
    for row in result["rows"]:
        for state, r in row["results"].items():
            yes_no = r["yes_no"]
            rows.append([row["protocol"], row["num_train_concepts"], state, report.pct(r["seen"]["all"]["success"]),
                         report.pct(r["held-out"]["all"]["success"]), report.pct(r["control"]["false_positive"]),
                         report.pct(r["random"]["all"]["detection"]), report.pct(r["negated"]["all"]["detection"]),
                         f"{report.pct(yes_no['no_injection']['yes'])} / {report.pct(yes_no['injected']['yes'])}",
                         f"{report.pct(yes_no['no_injection']['unanswered'])} / {report.pct(yes_no['injected']['unanswered'])}"])
    return intro + "\n\n" + report.markdown_table(
        ["protocol", "N", "model", "seen success", "held-out success", "control FP", "random-vector 'detection'",
         "negated-vector 'detection'", "'yes' to always-no: no injection / injected",
         "neither yes nor no: no injection / injected"], rows)


GOAL = {"held-out identification": (">=", 0.70), "random-vector 'detection'": ("<=", 0.10),
        "control false positives": ("<=", 0.02)}  # issue #5's goal on the embedded model


def meets(r: dict, goal: tuple[str, float]) -> bool:
    op, bound = goal
    return r["rate"] is not None and (r["rate"] >= bound if op == ">=" else r["rate"] <= bound)


def summary(study: Study, args) -> str:
    """The goal verdict, computed from the scaling study's JSON: every point with its three goal rates (Wilson 95%
    CI) and whether the point estimates meet the goal; written to study_summary.md."""
    result = json.loads((Path(args.figures) / "scaling_study.json").read_text())
    intro = (f"Goal: held-out identification ≥ 70%, random-vector 'detection' ≤ 10%, control false positives ≤ 2% "
             f"({result['model']} on {', '.join(result['hardware'])}, logprob scoring, seed {result['seed']}, all "
             "strengths pooled; point estimates with Wilson 95% CIs).")
    met, rows = [], []
    for curve in result["curves"]:
        for point in curve["points"]:
            ok = all(meets(point[name], goal) for name, goal in GOAL.items())
            met += [f"{curve['name']}, N={point['num_train_concepts']}"] if ok else []
            rows.append([curve["name"], point["num_train_concepts"], *[report.pct(point[name]) for name in GOAL],
                         "yes" if ok else "no"])
    best = max(((p["held-out identification"]["rate"], c["name"], p["num_train_concepts"]) for c in result["curves"]
                for p in c["points"]), default=None)
    verdict = (f"**Goal met** by: {'; '.join(met)}." if met else "**Goal not met** by any protocol and N tried.")
    if best:
        verdict += f" Highest held-out identification: {100 * best[0]:.0f}% ({best[1]}, N={best[2]})."
    fp_bound = max(p["control false positives"]["ci95"][1] for c in result["curves"] for p in c["points"])
    verdict += (f" With {result['curves'][0]['points'][0]['control false positives']['n']} control trials per point, "
                f"a false-positive rate of at most {100 * fp_bound:.0f}% is what the 95% CIs can establish.")
    text = intro + "\n\n" + report.markdown_table(["protocol", "N", *GOAL, "goal met"], rows) + "\n" + verdict + "\n"
    (Path(args.figures) / "study_summary.md").write_text(text)
    return text


def plot_scaling(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [label for _, _, label in SCALING_METRICS]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.8), sharex=True)
    for curve in result["curves"]:
        xs = [p["num_train_concepts"] for p in curve["points"]]
        style = "-" if curve["vector_token"] == "prompt-end" else "--"
        marker = "o" if not curve["random_negatives"] else "s"
        for ax, label in zip(axes, labels):
            rates = [p[label] for p in curve["points"]]
            ax.errorbar(xs, [r["rate"] for r in rates], yerr=report.ci_err(rates), linestyle=style, marker=marker,
                        capsize=3, label=curve["name"])
    points = sorted({p["num_train_concepts"] for c in result["curves"] for p in c["points"]})
    for ax, label in zip(axes, labels):
        ax.set_xscale("log")
        ax.set_xticks(points, [str(n) for n in points])
        ax.minorticks_off()
        ax.set_xlabel("training concepts N")
        ax.set_title(label, fontsize=10)
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("rate (fine-tuned, all strengths; 95% Wilson CI)")
    axes[-1].legend(fontsize=8, loc="center")
    fig.suptitle(f"Scaling study — {result['model']} on {', '.join(result['hardware'])} (logprob scoring, "
                 f"seed {result['seed']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def plot_sweep(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [label for _, _, label in SWEEP_METRICS]
    grids = result["grids"]
    fig, axes = plt.subplots(len(grids), len(labels), figsize=(3.6 * len(labels), 3.2 * len(grids)), squeeze=False,
                             layout="constrained")
    for r, (row_axes, grid) in enumerate(zip(axes, grids)):
        for c, (ax, label) in enumerate(zip(row_axes, labels)):
            values = [[r["rate"] for r in row[label]] for row in grid["rows"]]
            image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, line in enumerate(values):
                for j, v in enumerate(line):
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.5 else "black")
            ax.set_xticks(range(len(result["strengths"])), [s.rstrip("x") for s in result["strengths"]], fontsize=7)
            ax.set_yticks(range(len(result["layers"])), result["layers"], fontsize=8)
            if r == len(grids) - 1:
                ax.set_xlabel("strength (× typical residual norm)", fontsize=8)
            if c == 0:
                ax.set_ylabel(f"layer ({grid['vector_token']} vectors)", fontsize=9)
            ax.set_title(f"{label} ({grid['vector_token']})", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="rate (cells: %)")
    fig.suptitle(f"Layer × strength — {result['model']} on {', '.join(result['hardware'])} (fine-tuned per layer; "
                 f"logprob scoring, seed {result['seed']})", fontsize=10)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def study_parser(doc: str, runs: str = "runs/study",
                 figures: str = "where the figure, JSON and table go") -> argparse.ArgumentParser:
    """A study's command line: its docstring as help and the two folders of every study (--runs, --figures); flags it
    does not know go to the pipeline (parse_known_args)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=runs, help="parent folder of the points' run directories")
    parser.add_argument("--figures", default="figures", help=figures)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = study_parser(__doc__)
    parser.add_argument("part", choices=["scaling", "sweep", "controls", "summary"])
    parser.add_argument("--points", type=int, nargs="+", default=None,
                        help="numbers of training concepts (scaling: default 40 100 200 400 600; controls: default 40)")
    parser.add_argument("--vector-tokens", nargs="+", default=["prompt-end", "word"], choices=["prompt-end", "word"])
    parser.add_argument("--random-negatives", type=float, nargs="+", default=[0.0, 0.5],
                        help="fractions of negatives with a random direction (scaling)")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12, 16, 20, 24, 28], help="layers (sweep)")
    parser.add_argument("--strengths", nargs="+", default=SWEEP_STRENGTHS, help="evaluation strengths (sweep)")
    return parser


def main(argv=None) -> int:
    def action():
        args, pipeline_args = build_parser().parse_known_args(argv)
        args.points = args.points or ([40, 100, 200, 400, 600] if args.part == "scaling" else [40])
        Path(args.figures).mkdir(parents=True, exist_ok=True)
        {"scaling": scaling, "sweep": sweep, "controls": controls, "summary": summary}[args.part](
            Study(args, pipeline_args), args)

    return machinery.cli(action)  # the pipeline's logging; bad input one line and exit 2, Ctrl-C exit 130


if __name__ == "__main__":
    sys.exit(main())
