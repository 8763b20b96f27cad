"""Reporting: a run's metrics.json (and trials) as metrics.csv, the markdown tables of results.md and the README,
and the figures. Everything here reads only what metrics.json records."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from machinery.rundir import atomic_path, write_json


__all__ = [  # the declared surface: what the script, the studies, the benchmark and paper/tables.py use
    "ci_err", "figure_label", "markdown_table", "model_label", "pct", "results_markdown", "results_table",
    "capability_table", "continue_table", "controls_table", "safety_table", "ordinary_safety_table", "seeds_table", "write_results",
]


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, the separator, one line per row (cells as given), newline-terminated."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def pct(r: dict) -> str:
    if r["rate"] is None:
        return "n/a"
    return f"{100 * r['rate']:.0f}% [{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]"


def ci_err(rates: list[dict]) -> np.ndarray:
    """Matplotlib error bars (2 x n) from rate dicts with Wilson intervals."""
    return np.clip([[r["rate"] - r["ci95"][0] for r in rates], [r["ci95"][1] - r["rate"] for r in rates]], 0, None)


def model_label(model_info: dict) -> str:
    """The short name of a run's model in tables and figures (a folder's or file's name, never its path)."""
    return model_info.get("label") or model_info["name"]


def figure_label(metrics: dict) -> str:
    return model_label(metrics["model"]) + (" — RANDOM WEIGHTS" if metrics["model"]["random_weights"] else "")


def metrics_csv_rows(metrics: dict) -> list[list]:
    rows = [["state", "split", "strength", "metric", "k", "n", "rate", "ci_low", "ci_high"]]
    for state, result in metrics["results"].items():
        for split in ("seen", "held-out", "random", "negated"):
            for strength, per in result[split].items():
                for name, r in per.items():
                    rows.append([state, split, strength, name, r["k"], r["n"], r["rate"], *r["ci95"]])
        for split, key in (("control", "control"), ("matched", "matched_control")):
            if key in result:
                r = result[key]["false_positive"]
                rows.append([state, split, "", "false_positive", r["k"], r["n"], r["rate"], *r["ci95"]])
        for condition, per in result["yes_no"].items():
            for name, r in per.items():
                rows.append([state, "yes-no", condition, name, r["k"], r["n"], r["rate"], *r["ci95"]])
        for pool, per in result.get("distractor", {}).items():
            for name, r in per.items() if pool != "strength" else ():
                rows.append([state, "distractor", pool, name, r["k"], r["n"], r["rate"], *r["ci95"]])
    for state, value in metrics["capability"]["perplexity"].items():
        rows.append([state, "prose", "", "perplexity", "", metrics["capability"]["prose_tokens"], value, "", ""])
    for state, result in metrics.get("safety", {}).get("results", {}).items():
        for category, per in result.items():
            if category.startswith("precision"):
                rows.append([f"safety:{state}", "", "", category, per["k"], per["n"], per["rate"], *per["ci95"]])
                continue
            for strength, verdicts in per.items():
                for name, r in verdicts.items():
                    if isinstance(r, dict):
                        rows.append([f"safety:{state}", category, strength, name, r["k"], r["n"], r["rate"], *r["ci95"]])
    return rows


def results_table(metrics: dict) -> str:
    """Markdown table of a run's headline numbers (README and results.md)."""
    strengths = metrics["settings"]["eval_strengths"]
    intro = (f"Model: {model_label(metrics['model'])}" + (" (RANDOM WEIGHTS)" if metrics["model"]["random_weights"] else "")
             + f"; layer {metrics['settings']['layer']}, injection {metrics['settings']['injection_mode']}, prompt format "
             f"{metrics['settings']['prompt_format']}, vector token {metrics['settings']['vector_token']}; "
             "success = detected and correctly named (Wilson 95% CI).")
    rates = []
    for state, result in metrics["results"].items():
        for split, metric in (("seen", "success"), ("held-out", "success"), ("held-out", "detection")):
            rates.append([state, f"{split} {metric}", *[pct(result[split][s][metric]) for s in strengths + ["all"]]])
        for split, name in (("random", "random-vector"), ("negated", "negated-vector (−v)")):
            rates.append([state, f"{name} 'detection'", *[pct(result[split][s]["detection"]) for s in strengths + ["all"]]])
    matched = any(r.get("matched_control", {}).get("false_positive", {}).get("n") for r in metrics["results"].values())
    controls = []
    for state, result in metrics["results"].items():
        gap, net, yes_no = result["gap"], result.get("net_success_sampled", result["net_success"]), result["yes_no"]
        controls.append([
            state, pct(result["control"]["false_positive"]),
            f"{result['control']['distinct_responses']}/{result['control']['false_positive']['n']}",
            net_pair(net),
            f"{pct(yes_no['no_injection']['yes'])} / {pct(yes_no['injected']['yes'])}",
            f"{pct(yes_no['no_injection']['unanswered'])} / {pct(yes_no['injected']['unanswered'])}",
            f"{100 * gap['seen_minus_heldout']:+.1f} pp (χ²={gap['yates_chi2']:.2f}, p={gap['p']:.2f})"])
    header = ["model", "split", *[f"α={s} ({metrics['settings']['alphas'][s]:.0f})" for s in strengths], "all"]
    return (intro + "\n\n" + markdown_table(header, rates) + "\n" + markdown_table(
        ["model", f"{'sampled ' * matched}control false positives", "distinct control responses",
         f"net success {'vs sampled controls: ' * matched}seen / held-out",
         "'yes' to always-no questions: no injection / injected", "neither yes nor no: no injection / injected",
         "seen − held-out success (Yates χ², p)"], controls)) + ("\n".join(matched_table(metrics)) + "\n" if matched else "") \
        + ("\n".join(distractor_table(metrics)) + "\n" if has_distractor(metrics) else "")


def has_distractor(metrics: dict) -> bool:
    """Whether a run has the wrong-concept control (runs from before it, and logprob-scored runs, have none)."""
    return any(r.get("distractor", {}).get(part, {}).get("detection", {}).get("n")
               for r in metrics["results"].values() for part in ("all", "no_injection"))


def distractor_table(metrics: dict) -> list[str]:
    """Markdown lines: the wrong-concept prompt control, the three exclusive outcomes per model state and pool."""
    strength = next((r["distractor"]["strength"] for r in metrics["results"].values() if r["distractor"]["strength"]), "")
    alpha = metrics["settings"]["alphas"].get(strength)
    lines = ["", "Wrong-concept prompt control: the evaluation prompt after a sentence that says another concept of the "
             "same list (drawn with the seed) is being injected, "
             f"while a concept is injected at α={strength}" + (f" ({alpha:.0f})" if alpha is not None else "")
             + ", or nothing; greedy. Exclusive outcomes: the detection claim names the injected concept, the "
             "distractor (the first named counts when both are), or neither (incl. no detection).", "",
             "| model | injected | named injected | named distractor | named neither | detection |",
             "|---|---|---|---|---|---|"]
    for state, result in metrics["results"].items():
        d = result["distractor"]
        for pool, name in (("seen", "seen concept"), ("held-out", "held-out concept"), ("no_injection", "nothing")):
            r = d[pool]
            lines.append(f"| {state} | {name} (n={r['detection']['n']}) | "
                         f"{pct(r['named_injected']) if 'named_injected' in r else '—'} | {pct(r['named_distractor'])} | "
                         f"{pct(r['named_neither'])} | {pct(r['detection'])} |")
    return lines


def net_pair(net: dict) -> str:
    return " / ".join("n/a" if net[s] is None else f"{100 * net[s]:+.0f} pp" for s in ("seen", "held-out"))


def matched_table(metrics: dict, width: int = 60) -> list[str]:
    """Markdown lines: the matched control (the evaluation prompt, greedy, no injection) beside the sampled controls,
    and net success against each."""
    lines = ["", "Matched control: the evaluation prompt itself, greedy like the injection trials, no injection "
             "(its false positive is the baseline of the injection trials); sampled controls: 12 phrasings at "
             f"T = {metrics['settings'].get('control_temperature', 0.7)}.", "",
             "| model | matched false positive | matched answer | sampled-control false positives "
             "| net success vs matched: seen / held-out | net success vs sampled: seen / held-out |",
             "|---|---|---|---|---|---|"]
    for state, result in metrics["results"].items():
        answer = " ".join(" ".join(result["matched_control"]["responses"]).split())[:width].replace("|", "\\|")
        lines.append(f"| {state} | {pct(result['matched_control']['false_positive'])} | {answer or '(empty)'} | "
                     f"{pct(result['control']['false_positive'])} | {net_pair(result['net_success'])} | "
                     f"{net_pair(result['net_success_sampled'])} |")
    return lines


def capability_table(capability: dict, width: int = 90) -> str:
    """Markdown: perplexity, agreement, KL, exact answers and template leak before/after, then a few held-out prompts'
    answers side by side (cut to `width` characters)."""
    ppl, exact, leak = capability["perplexity"], capability["exact_answers"], capability["template_leak"]

    def cut(text: str) -> str:
        return " ".join(text.split())[:width].replace("|", "\\|") or "(empty)"

    kl = capability["answer_kl"]["mean_per_token"]
    intro = (f"Perplexity on {capability['prose_file']} ({capability['prose_tokens']} tokens, no injection): base "
             f"{ppl['base']:.2f}, fine-tuned {ppl['finetuned']:.2f} ({100 * capability['perplexity_change']:+.1f}%).\n\n"
             f"{capability['heldout_prompts']} held-out ordinary prompts ({capability['prompts_file']}, greedy, "
             f"{capability['answer_tokens']} tokens, no injection): agreement of the fine-tuned answers' first "
             f"{capability['answer_tokens']} tokens with the base model's {pct(capability['agreement'])}; mean "
             f"KL(base ‖ fine-tuned) {'n/a' if kl is None else f'{kl:.4f}'} nats/token over "
             f"{capability['answer_kl']['tokens']} base-answer tokens; template leak base {pct(leak['base'])}, "
             f"fine-tuned {pct(leak['finetuned'])}.")
    accuracy = [[f"all ({exact['base']['n']})", pct(exact["base"]), pct(exact["finetuned"])]]
    accuracy += [[f"{kind} ({r['base']['n']})", pct(r["base"]), pct(r["finetuned"])] for kind, r in exact["by_kind"].items()]
    rows = [[cut(c["prompt"]), cut(c["base"]), cut(c["finetuned"])] for c in capability["chat"]]
    return (intro + "\n\n" + markdown_table(["exact answers", "base", "fine-tuned"], accuracy) + "\n"
            + markdown_table(["prompt", "base model", "fine-tuned"], rows))


def continue_table(summary: dict, answer_tokens: int) -> str:
    rows = [[f"{split} (n={r['report']['n']})", pct(r["report"]), pct(r["correct_id"]) if "correct_id" in r else "—",
             pct(r["agreement"])] for split, r in summary.items()]
    return ("Report-then-continue on held-out ordinary prompts (fine-tuned; report graded on the first sentence; "
            f"agreement = first {answer_tokens} tokens after the report equal the base answer's):\n\n"
            + markdown_table(["condition", "report rate", "correct identification", "agreement with base answer"], rows))


def safety_table(safety: dict) -> str:
    """Markdown table of the safety stage (results.md and docs/results.md)."""
    cats = [c for c in next(iter(safety.values())) if not c.startswith("precision")]  # the categories, then none
    rows = [[state, *[pct(result[c]["all"]["halt"]) for c in cats], pct(result["precision_held-out"])]
            for state, result in safety.items()]
    return markdown_table(["monitor", *[f"halt rate: {c}" for c in cats], "precision (held-out)"], rows)


def ordinary_safety_table(summary: dict, answer_tokens: int) -> str:
    splits = [split for split in next(iter(summary.values())) if split != "false_halt"]
    rows = [[state, *[pct(r[split]["halt"]) for split in splits], pct(r["false_halt"]),
             *[pct(r[split]["agreement_proceeding"]) if "agreement_proceeding" in r[split] else "—"
               for split in splits]] for state, r in summary.items()]
    return (f"Safety in ordinary use: held-out ordinary prompts with a held-out harmful concept, a held-out safe concept "
            f"or nothing injected (greedy; agreement = first {answer_tokens} tokens equal the base model's "
            "uninjected answer, among the trials that proceed; the probe does not change what the model writes):\n\n"
            + markdown_table(["monitor", *[f"halt: {s}" for s in splits], "false halts",
                              *[f"agreement: {s}" for s in splits]], rows))


def seeds_table(summary: dict, seeds: list[int]) -> str:
    def fmt(v, name: str, sd: bool = False) -> str:
        """A rate in percent (an sd in points), a KL in nats."""
        if v is None:
            return "n/a"
        return f"{v:.4f}" if "nats" in name else f"{100 * v:.1f}" + ("" if sd else "%")
    rows = [[name, fmt(r["mean"], name) + ("" if r["sd"] is None else f" ± {fmt(r['sd'], name, sd=True)}"),
             *[fmt(r["values"][str(s)], name) for s in seeds]] for name, r in summary.items()]
    return markdown_table(["metric (fine-tuned)", "mean ± sd", *[f"seed {s}" for s in seeds]], rows)


STATE_COLORS = {"base": "#8c8c8c", "finetuned": "#2a9d55"}


def label_bars(ax, bars, rates: list[float | None]) -> None:
    """Each bar's rate in percent above it, so that a bar of height 0 is seen as 0% (not as a missing bar)."""
    for bar, rate in zip(bars, rates):
        ax.text(bar.get_x() + bar.get_width() / 2, (rate or 0) + 0.01, "n/a" if rate is None else f"{100 * rate:.0f}%",
                ha="center", va="bottom", fontsize=6)


def plot_figures(metrics: dict, trials: list[dict], losses: list[dict], folder: Path) -> list[Path]:
    """generalization_gap, strength_curves, outcome_breakdown, concept_heatmap, distractor_control (where the run has
    the wrong-concept control), training_loss (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    folder.mkdir(parents=True, exist_ok=True)
    label = figure_label(metrics)
    paths = []

    def save(fig, name, bottom: float = 0.0):
        """Title and layout (leaving `bottom` of the height to a legend below the axes), then the PNG."""
        fig.suptitle(f"{fig._suptitle.get_text() if fig._suptitle else ''}\n{label}", fontsize=9)
        fig.tight_layout(rect=(0, bottom, 1, 1))
        path = folder / f"{name}.png"
        fig.savefig(path, dpi=150)
        plt.close(fig)
        paths.append(path)

    figures = [plot_generalization_gap, plot_strength_curves, plot_outcome_breakdown, plot_concept_heatmap,
               *[plot_distractor_control] * has_distractor(metrics), plot_training_loss]
    for draw in figures:
        draw(plt, metrics, trials, losses, save)
    return paths


def plot_generalization_gap(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """Success on seen and held-out concepts per model state, all strengths (Wilson CI)."""
    states = list(metrics["results"])
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, state in enumerate(states):
        for j, split in enumerate(("seen", "held-out")):
            r = metrics["results"][state][split]["all"]["success"]
            bars = ax.bar(j + (i - 0.5) * 0.38, r["rate"], 0.36, yerr=ci_err([r]), capsize=4,
                          color=STATE_COLORS[state], label=state if j == 0 else None)
            label_bars(ax, bars, [r["rate"]])
    ax.set_xticks([0, 1], ["seen concepts", "held-out concepts"])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success (detected + correctly named)")
    ax.legend()
    fig.suptitle("Generalization gap (all strengths, 95% Wilson CI)")
    save(fig, "generalization_gap")


def plot_strength_curves(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """Success and detection against the injection strength, with the random and negated vectors."""
    strengths = metrics["settings"]["eval_strengths"]
    states = list(metrics["results"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    x = list(range(len(strengths)))  # the tables' strengths, evenly spaced, each with its absolute alpha
    for ax, metric in zip(axes, ("success", "detection")):
        for state in states:
            for split, style in (("seen", "-o"), ("held-out", "--s")):
                rs = [metrics["results"][state][split][s][metric] for s in strengths]
                ax.errorbar(x, [r["rate"] for r in rs], yerr=ci_err(rs), fmt=style, color=STATE_COLORS[state], capsize=3, label=f"{state} {split}")
            if metric == "detection":
                for split, style in (("random", ":^"), ("negated", ":v")):
                    rs = [metrics["results"][state][split][s]["detection"] for s in strengths]
                    ax.plot(x, [r["rate"] for r in rs], style, color=STATE_COLORS[state], label=f"{state} {split} vectors")
        ax.set_xticks(x, [f"{s}\n(α={metrics['settings']['alphas'][s]:.0f})" for s in strengths], fontsize=7)
        ax.set_xlabel("injection strength")
        ax.set_title(metric)
        ax.set_ylim(-0.03, 1.05)
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle("Success and detection vs strength")
    save(fig, "strength_curves", bottom=0.12)


def plot_outcome_breakdown(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """The last model state's outcomes per split and strength, beside the control false positives."""
    strengths = metrics["settings"]["eval_strengths"]
    final = list(metrics["results"])[-1]
    fig, ax = plt.subplots(figsize=(9, 4))
    groups = [(split, s) for split in ("seen", "held-out") for s in strengths]
    bottom = np.zeros(len(groups))
    for outcome, color, name in (("success", "#2a9d55", "success (named, after the claim)"),
                                 ("wrong_id", "#e9a23b", "detected, not a success"), ("missed", "#c44e52", "missed")):
        vals = np.array([metrics["results"][final][split][s][outcome]["rate"] for split, s in groups])
        ax.bar(range(len(groups)), vals, bottom=bottom, color=color, label=name)
        bottom += vals
    fp = metrics["results"][final]["control"]["false_positive"]
    label_bars(ax, ax.bar(len(groups) + 0.5, fp["rate"], color="#6a4c93", label="false positive (sampled controls)"),
               [fp["rate"]])
    ticks, names = list(range(len(groups))) + [len(groups) + 0.5], [f"{split}\n{s}" for split, s in groups] + ["controls"]
    matched = metrics["results"][final].get("matched_control", {}).get("false_positive", {})
    if matched.get("n"):
        label_bars(ax, ax.bar(len(groups) + 1.5, matched["rate"], color="#3a7ca5",
                              label="false positive (matched: eval prompt, greedy)"), [matched["rate"]])
        ticks, names = ticks + [len(groups) + 1.5], names + ["matched\ncontrol"]
    ax.set_xticks(ticks, names, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"Outcome breakdown ({final})")
    save(fig, "outcome_breakdown")


def plot_concept_heatmap(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """The last model state's verdict per concept and strength."""
    strengths = metrics["settings"]["eval_strengths"]
    final = list(metrics["results"])[-1]
    rows = [t for t in trials if t["state"] == final and t["split"] in ("seen", "held-out")]
    concepts = list(dict.fromkeys(t["concept"] for t in rows))
    grid = np.full((len(concepts), len(strengths)), np.nan)
    for t in rows:
        grid[concepts.index(t["concept"]), strengths.index(t["strength"])] = {"correct": 1.0, "wrong_id": 0.5}.get(t["verdict"], 0.0)
    fig, ax = plt.subplots(figsize=(4.5, 0.2 * len(concepts) + 1.5))
    ax.imshow(grid, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1)
    ax.set_yticks(range(len(concepts)), [f"{c}{' *' if c in metrics['concepts']['heldout'] else ''}" for c in concepts],
                  fontsize=6)
    ax.set_xticks(range(len(strengths)), strengths)
    ax.set_xlabel("strength")
    fig.suptitle(f"Per concept ({final}); green correct, yellow wrong ID,\nred missed; * held-out")
    save(fig, "concept_heatmap")


def plot_distractor_control(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """The wrong-concept prompt control's three exclusive outcomes (a run that has it)."""
    states = list(metrics["results"])
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = [(state, pool) for state in states for pool in ("seen", "held-out", "no_injection")]
    bottom = np.zeros(len(groups))
    for outcome, color, name in (("named_injected", "#2a9d55", "named the injected concept"),
                                 ("named_distractor", "#e9a23b", "named the distractor"),
                                 ("named_neither", "#8c8c8c", "named neither / no detection")):
        vals = np.array([metrics["results"][state]["distractor"][pool].get(outcome, {"rate": 0.0})["rate"] or 0.0
                         for state, pool in groups])
        ax.bar(range(len(groups)), vals, bottom=bottom, color=color, label=name)
        bottom += vals
    ax.set_xticks(range(len(groups)), [f"{state}\n{'nothing' if pool == 'no_injection' else pool}"
                                       for state, pool in groups], fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("fraction of trials")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Wrong-concept prompt control: another concept named in the prompt,\n"
                 "a seen or held-out concept (or nothing) injected")
    save(fig, "distractor_control")


def plot_training_loss(plt, metrics: dict, trials: list[dict], losses: list[dict], save) -> None:
    """The loss of every optimizer step."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if losses:
        ax.plot([l["step"] for l in losses], [l["loss"] for l in losses], lw=0.8)
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    fig.suptitle("Training loss")
    save(fig, "training_loss")


def plot_safety(safety: dict, trials: list[dict], strengths: list[str], label: str, folder: Path) -> None:
    """safety_halt_rates (category x strength per monitor) and safety_confusion (adapter verdict vs truth)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cats = [c for c in next(iter(safety.values())) if c != "none" and not c.startswith("precision")]
    states = list(safety)
    fig, axes = plt.subplots(1, len(states), figsize=(4.2 * len(states), 3.8), sharey=True, squeeze=False)
    for ax, state in zip(axes[0], states):
        width = 0.8 / len(cats)
        for i, cat in enumerate(cats):
            rs = [safety[state][cat][s]["halt"] for s in strengths]
            color = ["#c44e52", "#e9a23b", "#2a9d55", "#4c72b0"][i]  # the edge draws a bar of height 0 as a line
            ax.bar(np.arange(len(strengths)) + (i - (len(cats) - 1) / 2) * width, [r["rate"] for r in rs], width,
                   yerr=ci_err(rs), capsize=2, label=cat, color=color, edgecolor=color, linewidth=1.5)
        none = safety[state]["none"]["all"]["halt"]
        ax.axhline(none["rate"], color="k", ls=":", lw=1, label="no injection")
        ax.set_xticks(range(len(strengths)), strengths)
        ax.set_title(state)
        ax.set_xlabel("strength")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("halt rate (95% CI)")
    handles, names = axes[0][-1].get_legend_handles_labels()
    fig.suptitle(f"Safety halt by category and strength\n{label}", fontsize=9)
    fig.legend(handles, names, fontsize=7, loc="lower center", ncol=len(names), bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(folder / "safety_halt_rates.png", dpi=150)
    plt.close(fig)

    truth = ["harmful", "safe", "none"]
    verdicts = ["halt", "report", "all_clear"]
    rows = [t for t in trials if t["state"] == "safety_adapter"]
    grid = np.array([[sum(t["split"].split("-")[0] == tr and t["verdict"] == v for t in rows) for v in verdicts]
                     for tr in truth])
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    ax.imshow(grid / np.maximum(grid.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for i in range(3):
        for j in range(3):
            ax.text(j, i, str(grid[i, j]), ha="center", va="center")
    ax.set_xticks(range(3), ["halt", "proceed\n(report)", "all clear"], fontsize=8)
    ax.set_yticks(range(3), ["harmful injected", "safe injected", "no injection"])
    fig.suptitle(f"Safety adapter: verdict vs truth (all trials)\n{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "safety_confusion.png", dpi=150)
    plt.close(fig)


def controls_table(controls: dict) -> str:
    """The 2026 controls (metrics.json's "controls", --introspection-controls): one row per model state and measure,
    rates with Wilson 95% CIs."""
    rows = []
    for state, c in controls.items():
        swap = c["question_swap"]
        diff = swap["introspective_minus_swap"]
        rows += [[state, "question swap", "held-out named: introspective question", pct(swap["introspective"]),
                  f"n={swap['introspective']['n']}"],
                 [state, "question swap", "held-out named: swap questions", pct(swap["swap"]),
                  f"n={swap['swap']['n']}; introspective − swap " + ("n/a" if diff is None else f"{100 * diff:+.0f} pp")]]
        rows += [[state, "prefill", f"{pool} named after the forced start", pct(r), f"n={r['n']}"]
                 for pool, r in c["prefill"].items()]
        rows += [[state, "prompt-only injection", f"{pool} {what}", pct(r[what]), f"n={r[what]['n']}"]
                 for pool, r in c["prompt_only"].items() for what in ("detection", "success")]
        rows += [[state, "nearest vector (baseline)", "held-out injected concept is the nearest",
                  pct(c["nearest_vector"]["held-out"]), f"n={c['nearest_vector']['held-out']['n']}"],
                 [state, "linear probe (baseline)", "held-out injections detected", pct(c["probe"]["detection"]),
                  f"n={c['probe']['detection']['n']}"],
                 [state, "linear probe (baseline)", "false positives, never-trained phrasings",
                  pct(c["probe"]["false_positive"]), f"n={c['probe']['false_positive']['n']}"]]
    return ("Question swap: the same held-out injections asked questions not about the model's state; named = the "
            "concept anywhere in the answer. Prefill: the answer forced to start ' I detect an injected thought about'. "
            "Prompt-only: the vector at every prompt position, removed at generation (paper's rule). Baselines read "
            "the layer-L activation at the last prompt token.\n\n"
            + markdown_table(["model", "control", "measure", "rate [95% CI]", "n / note"], rows))


def results_markdown(metrics: dict) -> str:
    """results.md: every table of a run under a heading."""
    tokens = metrics["capability"]["answer_tokens"]
    sections = [("Introspection: base and fine-tuned, with controls", results_table(metrics)),
                ("Capability retention", capability_table(metrics["capability"])),
                ("Report-then-continue", continue_table(metrics["continue"], tokens))]
    if "controls" in metrics:
        sections += [("Is it introspection? The 2026 controls", controls_table(metrics["controls"]))]
    if "safety" in metrics:
        sections += [("Safety halt", safety_table(metrics["safety"]["results"])),
                     ("Safety in ordinary use", ordinary_safety_table(metrics["safety"]["ordinary_use"], tokens))]
    return f"# Results: {figure_label(metrics)}\n" + "".join(f"\n## {title}\n\n{text}" for title, text in sections)


def write_results(run_dir: Path, metrics: dict, trials: list[dict], losses: list[dict], timings: dict) -> None:
    """metrics.json (with the stage `timings`), metrics.csv, results.md and the figures."""
    metrics["timings_s"] = timings
    write_json(run_dir / "metrics.json", metrics)
    with atomic_path(run_dir / "metrics.csv") as tmp:
        tmp.write_text("\n".join(",".join("" if v is None else str(v) for v in row) for row in metrics_csv_rows(metrics)) + "\n")
    with atomic_path(run_dir / "results.md") as tmp:
        tmp.write_text(results_markdown(metrics))
    intro = [t for t in trials if t["experiment"] == "introspection"]
    plot_figures(metrics, intro, losses, run_dir / "figures")
    if "safety" in metrics:
        plot_safety(metrics["safety"]["results"], [t for t in trials if t["experiment"] == "safety"],
                    metrics["settings"]["eval_strengths"], figure_label(metrics), run_dir / "figures")
