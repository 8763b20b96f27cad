#!/usr/bin/env python3
"""The LaTeX report's tables and number macros (paper/generated/*.tex) from a finished run; nothing is recomputed.

    python paper/tables.py [RUN]      # from the repository root; RUN: a run directory or its metrics.json (figures/)

Reads the run's metrics.json, and beside it trials.jsonl (per-concept columns) and scaling_study.json (the
generalisation study) when present, plus the committed GPU benchmarks (benchmarks/h100_*.json); writes the paper's
Tables 3-6 and 8 beside this run's numbers, the setup, safety, performance and study tables, and macros.tex
(\\run... from the run, \\paper... from PAPER_RESULTS). `make -C paper` runs it, then latexmk. The pipeline never
imports this module: it only borrows the pipeline's statistics and labels.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from introspection_experiment import SAFETY_CATEGORIES, parse_strength, rate, select  # noqa: E402
from machinery import ConfigError, cli, read_input_file  # noqa: E402
from machinery.report import model_label, pct  # noqa: E402
from machinery.rundir import atomic_path, read_finished_trials, require_complete  # noqa: E402

log = logging.getLogger("paper")

# The paper's published numbers (arXiv 2511.21399v1, DeepSeek-7B), copied as printed: percentages, and counts where the
# paper gives them. Table 3: baseline vs fine-tuned; Table 4: held-out concepts x alpha (n = 20 each) with the 95% CI of
# success; Table 5: seen vs held-out at alpha = 40 and over all strengths, with the chi-squared test of §4.3; Table 6:
# held-out error breakdown (of 80); Table 8 (App. D): held-out concepts at alpha = 40 as (detected, identified, note);
# §4.5: held-out success per concept over the four strengths; App. C: hyperparameters.
PAPER_RESULTS = {
    "model": "DeepSeek-7B",
    "table3": {
        "detection": {"baseline": {"pct": 1.2, "k": 3, "n": 240}, "finetuned": {"pct": 95.0}, "change_pp": 93.8},
        "success": {"baseline": {"pct": 0.4, "k": 1, "n": 240}, "finetuned": {"pct": 70.0}, "change_pp": 69.6},
        "false_positive": {"baseline": {"pct": 6.7, "k": 4, "n": 60}, "finetuned": {"pct": 0.0}, "change_pp": -6.7},
    },
    "table4": {
        "40": {"detection": 95.0, "correct_id": 85.0, "wrong_id": 10.0, "success": 85.0, "ci95": [64, 95]},
        "60": {"detection": 95.0, "correct_id": 75.0, "wrong_id": 20.0, "success": 75.0, "ci95": [53, 89]},
        "80": {"detection": 95.0, "correct_id": 65.0, "wrong_id": 30.0, "success": 65.0, "ci95": [43, 82]},
        "100": {"detection": 95.0, "correct_id": 55.0, "wrong_id": 40.0, "success": 55.0, "ci95": [34, 74]},
        "false_positive": {"pct": 0.0, "k": 0, "n": 60, "ci95": [0, 6]},
    },
    "table5": {
        "40": {"seen": {"n": 40, "detection": 100.0, "success": 95.0},
               "held-out": {"n": 20, "detection": 95.0, "success": 85.0}},
        "all": {"seen": {"pct": 77.5, "k": 124, "n": 160}, "held-out": {"pct": 70.0, "k": 56, "n": 80}},
        "chi2": 1.23, "p": 0.27,
    },
    "table6": {"n": 80, "success": {"k": 56, "pct": 70.0}, "wrong_id": {"k": 20, "pct": 25.0},
               "missed": {"k": 4, "pct": 5.0}, "examples": 'origami → "lie"; galaxy → "IGN"'},
    "table8": {
        **{c: (True, True, "") for c in ("avalanche", "butterfly", "cactus", "compass", "galaxy", "glacier", "microscope",
                                         "octopus", "pyramid", "rainbow", "satellite", "telescope", "tornado", "treasure",
                                         "unicorn", "vampire", "volcano")},
        "crystal": (False, True, "inconsistent detection"), "origami": (True, False, '"lie"'),
        "dinosaur": (True, False, "repetition collapse"),
    },
    "per_concept_success": {
        **dict.fromkeys(("tornado", "volcano", "avalanche", "rainbow", "glacier", "satellite", "octopus", "cactus"), "100%"),
        **dict.fromkeys(("butterfly", "pyramid", "crystal", "compass", "telescope", "treasure", "microscope", "unicorn"),
                        "50–75%"),
        "origami": "0%", "dinosaur": "0%", "galaxy": "25%", "vampire": "25%",
    },
    "hyperparameters": {"layers": "32 (sic; the checkpoint has 30)", "layer": 20, "position": "final prompt token",
                        "strengths": ["40", "60", "80", "100"], "concepts": (40, 20), "lora": (32, 64, 0.1),
                        "lr": 2e-4, "epochs": 3, "batch": "4 (gradient accumulation 4)", "control_trials": 60},
}


PAPER_DIR = Path(__file__).resolve().parent


BENCHMARK_FILES = [PAPER_DIR.parent / "benchmarks" / f"{name}.json" for name in ("h100_bf16", "h100_4bit")]


NONE = "---"  # no counterpart


METRICS_BYTES = 64 << 20  # a metrics.json larger than this is refused (a run's is about 100 KB)


TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "α": r"$\alpha$", "→": r"$\to$",
               "−": "$-$", "–": "--", "—": "---"}


def tex(text) -> str:
    """Plain text as LaTeX: special characters escaped, "quotes" as ``quotes''."""
    return re.sub(r'"([^"]*)"', r"``\1''", "".join(TEX_SPECIAL.get(ch, ch) for ch in str(text)))


def tex_rate(r: dict | None, counts: bool = True) -> str:
    """'2.5\\% (2/80)' from a rate dict."""
    if not r or r["rate"] is None:
        return NONE
    return f"{100 * r['rate']:.1f}\\%" + (f" ({r['k']}/{r['n']})" if counts else "")


def tex_ci(lo: float, hi: float) -> str:
    """A 95% interval given in percent, rounded as the paper prints them."""
    return f"[{lo:.0f}\\%, {hi:.0f}\\%]"


def tex_paper(entry: dict | float | None) -> str:
    """A published percentage (with its count where the paper prints one)."""
    if entry is None:
        return NONE
    if not isinstance(entry, dict):
        entry = {"pct": entry}
    return f"{entry['pct']:.1f}\\%" + (f" ({entry['k']}/{entry['n']})" if "k" in entry else "")


def tex_sci(x: float) -> str:
    """2e-4 as $2\\times10^{-4}$."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"${float(mantissa):g}\\times10^{{{int(exponent)}}}$"


def tex_seconds(x: float | None) -> str:
    return NONE if x is None else f"{x:.1f}"


def tex_pp(value: float) -> str:
    return f"{value:+.1f} pp".replace("-", "$-$")


def tex_p(p: float) -> str:
    return "$p<0.001$" if p < 0.001 else f"$p={p:.2f}$"


def tex_strength(spec: str, alpha: float) -> str:
    return f"$\\alpha{{=}}{tex(spec)}$" if parse_strength(spec)[1] == "absolute" else f"{tex(spec)} ($\\alpha{{=}}{alpha:.0f}$)"


def tex_stack(lines: list[str]) -> str:
    """Lines stacked in one right-aligned table cell."""
    return "\\shortstack[r]{" + "\\\\".join(lines) + "}"


def tex_table(name: str, caption: str, columns: str, header: list[str], rows: list[list[str] | None],
              metrics: dict) -> str:
    """A booktabs table (rows of cells; None = a rule), labelled tab:<name>, with a do-not-edit header."""
    body = ["\\midrule" if row is None else " & ".join(row) + r" \\" for row in rows]
    return "\n".join([f"% Generated by paper/tables.py (run {metrics['config_hash']}); "
                      "do not edit.", r"\begin{table}[tbp]", r"\centering", r"\small", f"\\caption{{{caption}}}",
                      f"\\label{{tab:{name}}}", f"\\begin{{tabular}}{{{columns}}}", r"\toprule", *header, r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"


def run_label(metrics: dict) -> str:
    return tex(model_label(metrics["model"])) + (" (RANDOM WEIGHTS)" if metrics["model"]["random_weights"] else "")


def pool(rates: list[dict]) -> dict:
    """One rate (with Wilson CI) from several disjoint ones."""
    return rate(sum(r["k"] for r in rates), sum(r["n"] for r in rates))


def pooled(result: dict, metric: str) -> dict:
    """A metric over all seen and held-out injection trials (the paper's "all 240 injection trials")."""
    return pool([result[split]["all"][metric] for split in ("seen", "held-out")])


def stage_seconds(metrics: dict) -> dict[str, float]:
    """Seconds per stage of a run, model loading excluded (as in the GPU benchmarks)."""
    return {k: v for k, v in metrics.get("timings_s", {}).items() if not k.endswith("_peak_gib") and k != "load_model"}


def strength_pairs(metrics: dict) -> list[tuple[str | None, str | None]]:
    """The paper's alphas beside this run's strengths, lowest with lowest (the grids differ in units)."""
    ours = metrics["settings"]["eval_strengths"]
    theirs = PAPER_RESULTS["hyperparameters"]["strengths"]
    return [(theirs[i] if i < len(theirs) else None, ours[i] if i < len(ours) else None)
            for i in range(max(len(theirs), len(ours)))]


def table_setup(metrics: dict) -> str:
    s, hp = metrics["settings"], PAPER_RESULTS["hyperparameters"]
    t = s["training"]
    strengths = ", ".join(tex_strength(x, s["alphas"][x]) for x in s["eval_strengths"])
    rows = [["Model", PAPER_RESULTS["model"], run_label(metrics)],
            ["Decoder layers", tex(hp["layers"]), str(metrics["model"]["num_layers"])],
            ["Injection layer $L$", str(hp["layer"]), f"{s['layer']} ({tex(s['layer_convention'])})"],
            ["Injection positions", hp["position"], tex(s["injection_mode"])],
            ["Strengths (train = eval)" if s["train_strengths"] == s["eval_strengths"] else "Eval strengths",
             ", ".join(hp["strengths"]), strengths],
            ["Concepts seen / held-out", "{} / {}".format(*hp["concepts"]),
             f"{len(metrics['concepts']['train'])} / {len(metrics['concepts']['heldout'])}"],
            ["Training examples", "not stated", str(s["dataset_size"])],
            ["LoRA $r$ / alpha / dropout", "{} / {} / {}".format(*hp["lora"]),
             f"{t['lora_rank']} / {t['lora_alpha']} / {t['lora_dropout']}"],
            ["Learning rate, epochs", f"{tex_sci(hp['lr'])}, {hp['epochs']}", f"{tex_sci(t['lr'])}, {t['epochs']}"],
            ["Batch", hp["batch"], f"{t['batch_size'] * t['grad_accum']} (micro-batch {t['batch_size']})"],
            ["Optimizer steps", "not stated", str(metrics["training"]["steps"])],
            ["Decoding", "not stated", f"greedy, {s['max_new_tokens']} new tokens; controls sampled at "
                                       f"$T={s['control_temperature']:g}$"],
            ["Control trials", str(hp["control_trials"]), str(metrics["results"]["finetuned"]["control"]["false_positive"]["n"])]]
    caption = "Setup: the paper's stated settings beside this run's."
    return tex_table("setup", caption, "lp{0.28\\linewidth}p{0.36\\linewidth}",
                     [r"Setting & Paper & This run \\"], rows, metrics)


def table_baseline_vs_finetuned(metrics: dict) -> str:
    """Paper Table 3, with this run's controls added below (the paper has none)."""
    base, ft = metrics["results"]["base"], metrics["results"]["finetuned"]
    ours = {"detection": (pooled(base, "detection"), pooled(ft, "detection")),
            "success": (pooled(base, "success"), pooled(ft, "success")),
            "false_positive": (base["control"]["false_positive"], ft["control"]["false_positive"]),
            "matched": (matched_fp(base), matched_fp(ft)),
            "random": (base["random"]["all"]["detection"], ft["random"]["all"]["detection"]),
            "negated": (base["negated"]["all"]["detection"], ft["negated"]["all"]["detection"]),
            "yes": (base["yes_no"]["injected"]["yes"], ft["yes_no"]["injected"]["yes"])}
    if distractor(ft, "all", "detection"):  # the wrong-concept control (runs from before it have none)
        ours.update({f"distractor_{key}": (distractor(base, pool, outcome), distractor(ft, pool, outcome))
                     for key, pool, outcome in DISTRACTOR_ROWS})
    names = {"detection": "Detection rate", "success": "Overall success", "false_positive": "False positive rate",
             "matched": "Matched-control false positive",
             **{f"distractor_{key}": name for key, name in DISTRACTOR_NAMES.items()},
             "random": "Random-vector ``detection''", "negated": "Negated-vector ($-v$) ``detection''",
             "yes": "``Yes'' to always-no questions, injected"}
    rows = []
    for key, (b, f) in ours.items():
        paper = PAPER_RESULTS["table3"].get(key)
        rows.append([names[key], "paper", tex_paper(paper and paper["baseline"]), tex_paper(paper and paper["finetuned"]),
                     tex_pp(paper["change_pp"]) if paper else NONE])
        change = (tex_pp(100 * (f["rate"] - b["rate"])) if f and b and f["rate"] is not None and b["rate"] is not None
                  else NONE)
        rows += [["", "this run", tex_rate(b), tex_rate(f), change], None]
    caption = ("Baseline vs fine-tuned over all injection trials (seen and held-out, every strength) and the "
               "no-injection controls (paper Table 3), then this run's controls, which the paper does not have. "
               "The false positive rate is that of the sampled no-injection controls (the training prompts and "
               f"phrasings never seen in training, $T={metrics['settings'].get('control_temperature', 0.7):g}$); the "
               "matched control is the evaluation prompt itself, answered greedily like the injection trials, with "
               "no injection." + (" Wrong-concept control: the evaluation prompt names another concept (the "
               "distractor) while a concept is injected (or nothing); exclusive outcomes, the first concept named "
               "counting when both are." if "distractor_heldout_injected" in ours else "")
               + " The paper's fine-tuned column equals its held-out-only numbers (Tables 4 and 6).")
    return tex_table("baseline-vs-finetuned", caption, "llrrr",
                     [r"Metric & Source & Baseline & Fine-tuned & Change \\"], rows[:-1], metrics)


DISTRACTOR_ROWS = (("heldout_injected", "held-out", "named_injected"), ("heldout_distractor", "held-out", "named_distractor"),
                   ("seen_distractor", "seen", "named_distractor"), ("echo", "no_injection", "named_distractor"))
DISTRACTOR_NAMES = {"heldout_injected": "Wrong-concept prompt, held-out injected: names it",
                    "heldout_distractor": "Wrong-concept prompt, held-out injected: names distractor",
                    "seen_distractor": "Wrong-concept prompt, seen injected: names distractor",
                    "echo": "Wrong-concept prompt, nothing injected: names distractor"}


def matched_fp(result: dict) -> dict | None:
    """The matched control's false positive (None in runs from before it)."""
    fp = result.get("matched_control", {}).get("false_positive")
    return fp if fp and fp["n"] else None


def distractor(result: dict, pool: str, outcome: str) -> dict | None:
    """A rate of the wrong-concept control (None where the run has none)."""
    r = result.get("distractor", {}).get(pool, {}).get(outcome)
    return r if r and r["n"] else None


def table_heldout_by_strength(metrics: dict) -> str:
    """Paper Table 4: held-out concepts x strength, success with its Wilson 95% CI."""
    ft, alphas = metrics["results"]["finetuned"], metrics["settings"]["alphas"]
    keys = ("detection", "correct_id", "wrong_id", "success")
    rows = []
    for theirs, ours in strength_pairs(metrics):
        paper = PAPER_RESULTS["table4"].get(theirs)
        rows.append([f"$\\alpha{{=}}{theirs}$" if theirs else NONE, "paper",
                     *[tex_paper(paper and paper[k]) for k in keys], tex_ci(*paper["ci95"]) if paper else NONE])
        r = ft["held-out"][ours] if ours else None
        rows += [[tex_strength(ours, alphas[ours]) if ours else NONE, "this run",
                  *[tex_rate(r and r[k]) for k in keys],
                  tex_ci(*(100 * x for x in r["success"]["ci95"])) if r else NONE], None]
    fp, paper_fp = ft["control"]["false_positive"], PAPER_RESULTS["table4"]["false_positive"]
    rows += [["controls", "paper", "", "", "", tex_paper(paper_fp) + " FP", tex_ci(*paper_fp["ci95"])],
             ["", "this run", "", "", "", tex_rate(fp) + " FP", tex_ci(*(100 * x for x in fp["ci95"]))]]
    caption = ("Fine-tuned model on held-out concepts by strength (paper Table 4). Rows pair the paper's $i$-th "
               "strength with this run's $i$-th; the CI is the Wilson 95\\% interval of success; the last rows are the "
               "no-injection controls' false positive (FP) rate. Correct ID: detected and the concept named in any "
               "order; success: detected, named, and the detection phrase first.")
    return tex_table("heldout-by-strength", caption, "llrrrrr",
                     [r"Strength & Source & Detection & Correct ID & Wrong ID & Success & 95\% CI \\"], rows, metrics)


def table_seen_vs_heldout(metrics: dict) -> str:
    """Paper Table 5: seen vs held-out at the lowest strength and over all strengths, with the Yates chi-squared test."""
    ft, s, t5 = metrics["results"]["finetuned"], metrics["settings"], PAPER_RESULTS["table5"]
    lowest = s["eval_strengths"][0]
    rows = []
    for split, name in (("seen", "Seen (training)"), ("held-out", "Held-out")):
        paper = t5["40"][split]
        rows += [[name, f"paper ($n={paper['n']}$)", tex_paper(paper["detection"]), tex_paper(paper["success"]),
                  tex_paper(t5["all"][split])],
                 ["", "this run", tex_rate(ft[split][lowest]["detection"]), tex_rate(ft[split][lowest]["success"]),
                  tex_rate(ft[split]["all"]["success"])], None]
    gap = ft["gap"]
    rows += [["Seen $-$ held-out", "paper", "", "",
              f"{tex_pp(t5['all']['seen']['pct'] - t5['all']['held-out']['pct'])} ($\\chi^2={t5['chi2']:.2f}$, "
              f"{tex_p(t5['p'])})"],
             ["", "this run", "", "", f"{tex_pp(100 * gap['seen_minus_heldout'])} ($\\chi^2={gap['yates_chi2']:.2f}$, "
                                      f"{tex_p(gap['p'])})"]]
    caption = (f"Seen vs held-out concepts, fine-tuned (paper Table 5): at the lowest strength (paper $\\alpha{{=}}40$, "
               f"this run {tex_strength(lowest, s['alphas'][lowest])}) and over all strengths, with a Yates-corrected "
               "$\\chi^2$ test of the success gap.")
    return tex_table("seen-vs-heldout", caption, "llrrl",
                     [r"Concepts & Source & Detection, lowest & Success, lowest & Success, all strengths \\"],
                     rows, metrics)


def finetuned_introspection(trials: list[dict]) -> list[dict]:
    return [t for t in trials if t["experiment"] == "introspection" and t["state"] == "finetuned"]


def wrong_names(trials: list[dict] | None) -> str:
    """The three names the fine-tuned model gives most often for held-out concepts it detects but misnames."""
    if trials is None:
        return NONE
    named = [t["named"] for t in select(finetuned_introspection(trials), "held-out", "all") if t["verdict"] == "wrong_id"]
    counts = sorted(((named.count(n), n) for n in set(named) if n), key=lambda x: (-x[0], x[1]))[:3]
    return "; ".join(f"``{tex(n)}'' ({c})" for c, n in counts) or NONE


def table_error_breakdown(metrics: dict, trials: list[dict] | None) -> str:
    """Paper Table 6: outcomes of the held-out injection trials over all strengths."""
    ft, t6 = metrics["results"]["finetuned"]["held-out"]["all"], PAPER_RESULTS["table6"]
    rows = [[name, f"{t6[key]['k']}/{t6['n']} ({t6[key]['pct']:.1f}\\%)", f"{ft[key]['k']}/{ft[key]['n']} "
             f"({tex_rate(ft[key], counts=False)})"]
            for key, name in (("success", "True positive (success)"), ("wrong_id", "Detected, wrong ID"),
                              ("missed", "False negative (missed)"))]
    rows.append(["Wrong names, e.g.", tex(t6["examples"]), wrong_names(trials)])
    caption = ("Error breakdown on held-out concepts, all strengths (paper Table 6). This run's wrong names are the "
               "three it gives most often for a held-out concept (count).")
    return tex_table("error-breakdown", caption, "lp{0.3\\linewidth}p{0.3\\linewidth}",
                     [f"Outcome & Paper ({PAPER_RESULTS['model']}) & This run \\\\"], rows, metrics)


def table_per_concept(metrics: dict, trials: list[dict] | None) -> str:
    """Paper Table 8 (held-out concepts at the lowest strength) and §4.5 (success over all strengths), per concept."""
    s, t8, overall = metrics["settings"], PAPER_RESULTS["table8"], PAPER_RESULTS["per_concept_success"]
    lowest, mark = s["eval_strengths"][0], {True: r"\checkmark", False: r"$\times$", None: NONE}
    ours = finetuned_introspection(trials) if trials is not None else None
    rows = []
    for concept in list(dict.fromkeys(metrics["concepts"]["heldout"] + list(t8))):
        detected, identified, note = t8.get(concept, (None, None, NONE))
        row = [tex(concept), mark[detected], mark[identified], tex(note), tex(overall.get(concept, NONE))]
        mine = [t for t in select(ours, "held-out", "all") if t["concept"] == concept] if ours is not None else []
        low = [t for t in mine if t["strength"] == lowest]
        if low:
            t = low[0]
            wrong = t["verdict"] == "wrong_id" and t["named"]
            row += [mark[t["detected"]], mark[t["identified"]], f"``{tex(t['named'])}''" if wrong else "",
                    f"{sum(t['verdict'] == 'correct' for t in mine)}/{len(mine)}"]
        else:
            row += [NONE] * 4
        rows.append(row)
    header = [f"& \\multicolumn{{4}}{{c}}{{Paper, $\\alpha{{=}}40$}} & \\multicolumn{{4}}{{c}}{{This run, "
              f"{tex_strength(lowest, s['alphas'][lowest])}}} \\\\",
              r"\cmidrule(lr){2-5}\cmidrule(lr){6-9}",
              r"Concept & Det. & Id. & Note & Success, all $\alpha$ & Det. & Id. & Named & Success, all \\"]
    caption = ("Held-out concepts one by one (paper Table 8 at $\\alpha{=}40$ and the per-concept success over the "
               "four strengths from its \\S4.5, beside this run at its lowest strength and over its strengths). "
               "Det.: a detection claim; Id.: the concept named; success: detected and named, detection first.")
    return tex_table("per-concept", caption, "lccp{0.17\\linewidth}ccclc", header, rows, metrics)


def table_safety(metrics: dict) -> str:
    """The safety-halt stage: halt rate per monitor x category (the paper reports no numbers for it)."""
    cats = list(SAFETY_CATEGORIES) + ["none"]
    results = metrics.get("safety", {}).get("results", {})
    rows = [["paper", *[NONE] * (len(cats) + 1)]]
    rows += [[tex(state.replace("_", " ")), *[tex(pct(result[c]["all"]["halt"])) for c in cats],
              tex(pct(result["precision_held-out"]))] for state, result in results.items()]
    if not results:
        rows.append(["this run (no safety stage)", *[NONE] * (len(cats) + 1)])
    caption = ("Safety halt (not in the paper; its reference code and README claim a working halt without numbers): "
               "halt rate [Wilson 95\\% CI] per injected category, all strengths; ``none'' is no injection; "
               "precision is the share of halts on held-out categories that were harmful.")
    return tex_table("safety", caption, "l" + "r" * (len(cats) + 1),
                     ["Monitor & " + " & ".join(tex(c.replace("-", " ")) for c in cats) + r" & Precision \\"],
                     rows, metrics)


def table_performance(metrics: dict, benchmarks: list[dict]) -> str:
    """Seconds per stage: this run, and the GPU benchmarks (random weights of DeepSeek-7B's shape)."""
    times = stage_seconds(metrics)
    benches = [{r["stage"]: r for r in b["stages"]} for b in benchmarks]
    stages = list(dict.fromkeys(list(times) + [st for b in benches for st in b]))
    rows = [[tex(st), tex_seconds(times.get(st)), *[tex_seconds(b[st]["seconds"] if st in b else None) for b in benches], NONE]
            for st in stages]
    rows += [None, ["total (excl.\\ model loading)", tex_seconds(sum(times.values()) if times else None),
                    *[tex_seconds(b["total_compute_s"]) for b in benchmarks], NONE],
             ["peak GPU memory (GiB)", NONE, *[f"{b['peak_gib']:.1f}" for b in benchmarks], NONE],
             ["LoRA training tokens/s (MFU)", NONE,
              *[f"{b['train']['tokens_per_s']:.0f} ({100 * b['train']['mfu']:.1f}\\%)" if "train" in b else NONE
                for b in benches], NONE]]
    m = metrics["model"]
    heads = [tex_stack([tex(model_label(m)), tex(m["device"].upper())] + ["RANDOM WEIGHTS"] * m["random_weights"])]
    heads += [tex_stack([tex(b["device"].replace("NVIDIA ", "")), "4-bit NF4" if b["load_in_4bit"] else tex(b["dtype"])]
                        + ["RANDOM WEIGHTS"] * b["random_weights"]) for b in benchmarks]
    models = ", ".join(sorted({tex(b["model"]) + (" (RANDOM WEIGHTS: timings only, no results)" if b["random_weights"]
                                                  else "") for b in benchmarks})) or NONE
    caption = (f"Compute: seconds per stage of this run and of the GPU benchmark of the same pipeline on {models}. "
               "The paper reports no timings.")
    return tex_table("performance", caption, "l" + "r" * (len(benchmarks) + 2),
                     ["Stage & " + " & ".join(heads) + r" & Paper \\"], rows, metrics)


def paper_macros(metrics: dict, benchmarks: list[dict]) -> dict[str, str]:
    """Every number the report's prose uses, as LaTeX macros: \\run... from this run, \\paper... from PAPER_RESULTS."""
    s, m = metrics["settings"], metrics["model"]
    base, ft = metrics["results"]["base"], metrics["results"]["finetuned"]
    lowest, highest = s["eval_strengths"][0], s["eval_strengths"][-1]
    t3, t4, t5 = PAPER_RESULTS["table3"], PAPER_RESULTS["table4"], PAPER_RESULTS["table5"]
    macros = {
        "runModel": run_label(metrics), "runModelSource": tex(m["source"]), "runDevice": tex(m["device"].upper()),
        "runDtype": tex(m["dtype"]), "runLayers": str(m["num_layers"]), "runHidden": str(m["hidden_size"]),
        "runLayer": str(s["layer"]), "runInjectionMode": tex(s["injection_mode"]), "runVectorToken": tex(s["vector_token"]),
        "runPromptFormat": tex(s["prompt_format"]), "runTypicalNorm": f"{s['typical_norm']:.0f}",
        "runStrengths": ", ".join(tex_strength(x, s["alphas"][x]) for x in s["eval_strengths"]),
        "runLowest": tex_strength(lowest, s["alphas"][lowest]), "runHighest": tex_strength(highest, s["alphas"][highest]),
        "runDatasetSize": str(s["dataset_size"]), "runSteps": str(metrics["training"]["steps"]),
        "runFinalLoss": f"{metrics['training']['final_loss']:.3f}", "runSeed": str(s["seed"]),
        "runSeen": str(len(metrics["concepts"]["train"])), "runHeldout": str(len(metrics["concepts"]["heldout"])),
        "runBaseDetection": tex_rate(pooled(base, "detection")), "runBaseSuccess": tex_rate(pooled(base, "success")),
        "runBaseFalsePositive": tex_rate(base["control"]["false_positive"]),
        "runBaseYesNoInjection": tex_rate(base["yes_no"]["no_injection"]["yes"]),
        "runSeenSuccess": tex_rate(ft["seen"]["all"]["success"]), "runHeldoutSuccess": tex_rate(ft["held-out"]["all"]["success"]),
        "runHeldoutDetection": tex_rate(ft["held-out"]["all"]["detection"]),
        "runHeldoutWrongId": tex_rate(ft["held-out"]["all"]["wrong_id"]),
        "runHeldoutLowestSuccess": tex_rate(ft["held-out"][lowest]["success"]),
        "runFalsePositive": tex_rate(ft["control"]["false_positive"]),
        "runMatchedFalsePositive": tex_rate(matched_fp(ft)), "runBaseMatchedFalsePositive": tex_rate(matched_fp(base)),
        "runMatchedAnswer": tex(" ".join(" ".join(ft.get("matched_control", {}).get("responses", [])).split())[:60])
                            or NONE,
        **{f"runDistractor{''.join(w.capitalize() for w in key.split('_'))}": tex_rate(distractor(ft, pool, outcome))
           for key, pool, outcome in DISTRACTOR_ROWS},
        "runDistractorStrength": (tex_strength(ft["distractor"]["strength"], s["alphas"][ft["distractor"]["strength"]])
                                  if distractor(ft, "all", "detection") and ft["distractor"]["strength"] else NONE),
        "runDistinctControls": f"{ft['control']['distinct_responses']}/{ft['control']['false_positive']['n']}",
        "runBaseDistinctControls": f"{base['control']['distinct_responses']}/{base['control']['false_positive']['n']}",
        "runRandomDetection": tex_rate(ft["random"]["all"]["detection"]),
        "runRandomLowest": tex_rate(ft["random"][lowest]["detection"]),
        "runRandomHighest": tex_rate(ft["random"][highest]["detection"]),
        "runNegatedLowest": tex_rate(ft["negated"][lowest]["detection"]),
        "runNegatedHighest": tex_rate(ft["negated"][highest]["detection"]),
        "runYesNoUnanswered": tex_rate(pool([ft["yes_no"][c]["unanswered"] for c in ("no_injection", "injected")])),
        "runGap": tex_pp(100 * ft["gap"]["seen_minus_heldout"]), "runGapChi": f"{ft['gap']['yates_chi2']:.2f}",
        "runGapP": tex_p(ft["gap"]["p"]),
        "paperModel": PAPER_RESULTS["model"], "paperBaseDetection": tex_paper(t3["detection"]["baseline"]),
        "paperBaseSuccess": tex_paper(t3["success"]["baseline"]),
        "paperBaseFalsePositive": tex_paper(t3["false_positive"]["baseline"]),
        "paperHeldoutFortySuccess": tex_paper(t4["40"]["success"]), "paperHeldoutFortyCI": tex_ci(*t4["40"]["ci95"]),
        "paperHeldoutHundredSuccess": tex_paper(t4["100"]["success"]),
        "paperFalsePositive": tex_paper(t4["false_positive"]), "paperSeenAll": tex_paper(t5["all"]["seen"]),
        "paperHeldoutAll": tex_paper(t5["all"]["held-out"]),
        "paperGap": tex_pp(t5["all"]["seen"]["pct"] - t5["all"]["held-out"]["pct"]),
        "paperGapChi": f"{t5['chi2']:.2f}", "paperGapP": tex_p(t5["p"]),
    }
    safety = metrics.get("safety", {}).get("results", {})
    for state in ("base", "probe", "safety_adapter"):  # the same names whether or not the run has a safety stage
        for cat in list(SAFETY_CATEGORIES) + ["none"]:
            name = "".join(w.capitalize() for w in re.split("[-_]", f"{state}-{cat}"))
            macros[f"runSafety{name}"] = tex_rate(safety[state][cat]["all"]["halt"]) if state in safety else NONE
    capability = metrics["capability"]
    macros["runPerplexityBase"] = f"{capability['perplexity']['base']:.1f}"
    macros["runPerplexityFinetuned"] = f"{capability['perplexity']['finetuned']:.1f}"
    macros["runPerplexityChange"] = f"{100 * capability['perplexity_change']:+.0f}\\%"
    lm = metrics["settings"]["language_modelling"]
    macros["runRecipe"] = tex(lm["recipe"])
    macros["runReplayRows"], macros["runReplayTokens"] = str(lm["replay_rows"]), str(lm["replay_tokens"])
    macros["runKLWeight"] = f"{lm['kl_weight']:g}"
    macros["runAgreement"] = tex_rate(capability["agreement"])
    macros["runAnswerKL"] = f"{capability['answer_kl']['mean_per_token']:.3f}"
    macros["runTemplateLeak"] = tex_rate(capability["template_leak"]["finetuned"])
    exact = capability["exact_answers"]
    for state in ("base", "finetuned"):
        macros[f"runExact{state.capitalize()}"] = tex_rate(exact[state])
        macros[f"runExactYesNo{state.capitalize()}"] = tex_rate(exact["by_kind"]["yes-no"][state])
    times = stage_seconds(metrics)
    macros["runComputeSeconds"] = f"{sum(times.values()):.0f}" if times else NONE
    macros["runBenchDevice"] = tex(benchmarks[0]["device"].replace("NVIDIA ", "")) if benchmarks else NONE
    for key, four_bit in (("BenchBf", False), ("BenchFourBit", True)):
        b = next((b for b in benchmarks if b["load_in_4bit"] == four_bit), None)
        macros[f"run{key}Seconds"] = f"{b['total_compute_s']:.0f}" if b else NONE
        macros[f"run{key}Peak"] = f"{b['peak_gib']:.1f}" if b else NONE
    return macros


def table_study(metrics: dict, study: dict | None) -> str:
    """The generalisation study's scaling points (studies/generalization_study.py), which the paper does not have."""
    names = ["held-out identification", "random-vector 'detection'", "control false positives"]
    rows = [[tex(c["name"]), str(p["num_train_concepts"]), *(tex_rate(p[n]) for n in names)]
            for c in (study or {}).get("curves", []) for p in c["points"]] or [[NONE] * 5]
    caption = ("Generalisation study (no counterpart in the paper): the fine-tuned model's held-out identification, "
               "random-vector ``detection'' and control false positives against the number of training concepts $N$, "
               "all strengths pooled" + (f"; {tex(study['model'])} on {tex(', '.join(study['hardware']))}, logprob scoring, seed "
                                         f"{study['seed']}." if study
                                         else "; no study results beside this run."))
    return tex_table("study", caption, "lrrrr", [r"Protocol & $N$ & Held-out ID & Random ``det.'' & Control FP \\"],
                     rows, metrics)


def write_paper_tables(metrics: dict, trials: list[dict] | None, benchmarks: list[dict], folder: Path,
                       study: dict | None = None) -> list[Path]:
    """paper/generated/*.tex: the paper's Tables 3-6 and 8 beside this run's, setup, safety, performance, the
    generalisation study, macros."""
    try:  # every table before anything is written
        tables = {"setup": table_setup(metrics), "baseline_vs_finetuned": table_baseline_vs_finetuned(metrics),
                  "heldout_by_strength": table_heldout_by_strength(metrics),
                  "seen_vs_heldout": table_seen_vs_heldout(metrics),
                  "error_breakdown": table_error_breakdown(metrics, trials),
                  "per_concept": table_per_concept(metrics, trials), "safety": table_safety(metrics),
                  "performance": table_performance(metrics, benchmarks), "study": table_study(metrics, study)}
        macros = paper_macros(metrics, benchmarks)
    except KeyError as e:  # metrics.json of an older version (accepted by require_complete, without a status)
        raise ConfigError(f"the run's metrics have no {e} (written by an older version of the pipeline, before the "
                          "paper tables used it): rerun that command with this version, then make the tables") from None
    folder.mkdir(parents=True, exist_ok=True)
    tables["macros"] = ("% Generated by paper/tables.py; do not edit.\n"
                        + "".join(f"\\newcommand{{\\{k}}}{{{v}}}\n" for k, v in macros.items()))
    paths = []
    for name, text in tables.items():
        with atomic_path(folder / f"{name}.tex") as tmp:
            tmp.write_text(text)
        paths.append(folder / f"{name}.tex")
    return paths


def paper_inputs(source: str) -> tuple[dict, list[dict] | None, list[dict], dict | None]:
    """A finished run's metrics (a run directory or its metrics.json), the trials.jsonl and generalisation study
    (scaling_study.json) beside it if there, and the committed GPU benchmarks."""
    path = Path(source)
    metrics_path = path / "metrics.json" if path.is_dir() else path
    try:
        metrics = require_complete(json.loads(read_input_file(metrics_path, "run metrics", METRICS_BYTES)),
                                   metrics_path)
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read run metrics {metrics_path}: {e}") from None
    trials_path, study_path = metrics_path.with_name("trials.jsonl"), metrics_path.with_name("scaling_study.json")
    return (metrics, checked_trials(metrics, trials_path) if trials_path.exists() else None,
            [json.loads(p.read_text()) for p in BENCHMARK_FILES if p.exists()],
            json.loads(study_path.read_text()) if study_path.exists() else None)


def checked_trials(metrics: dict, path: Path) -> list[dict]:
    """The run's trials.jsonl, refused in one line as the pipeline refuses it (read_finished_trials: the rows the
    manifest recorded), and unless it holds as many introspection trials of each model state and split (seen,
    held-out) as metrics.json counts: the tables' per-concept columns come from these rows."""
    trials = read_finished_trials(path)
    for state, result in metrics["results"].items():
        rows = [t for t in trials if t.get("experiment") == "introspection" and t.get("state") == state]
        for split in ("seen", "held-out"):
            have = sum(t.get("split") == split for t in rows)
            want = result.get(split, {}).get("all", {}).get("success", {}).get("n")
            if want is not None and have != want:
                raise ConfigError(f"{path} holds {have} {state} {split} introspection trials where metrics.json "
                                  f"counts {want}: rows are missing or were added; rerun the run (or copy its "
                                  "trials.jsonl again)")
    return trials


def paper_tables_from(source: str) -> list[Path]:
    """Regenerate paper/generated from a finished run (see paper_inputs). Nothing is recomputed."""
    metrics, trials, benchmarks, study = paper_inputs(source)
    paths = write_paper_tables(metrics, trials, benchmarks, PAPER_DIR / "generated", study)
    log.info("Wrote %d files to %s from %s%s", len(paths), PAPER_DIR / "generated", source,
             "" if trials is not None else " (no trials.jsonl beside it: per-concept columns left empty)")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="figures", metavar="RUN",
                        help="a finished run's directory or metrics.json (default: figures, the committed run)")
    return cli(lambda: paper_tables_from(parser.parse_args(argv).run))


if __name__ == "__main__":
    sys.exit(main())
