#!/usr/bin/env python3
"""Agreement noise floor: how far do greedy answers move when the model barely changes? The capability benchmark's
agreement (an answer's first 16 greedy tokens equal to the base model's, on the held-out ordinary prompts) and mean
KL(base ‖ changed) over the base answers' tokens, for changes of known size and no training:

- LoRA adapters of the training's shape (--lora-rank, --lora-alpha, the same modules) with A at peft's initialisation
  and every B drawn from N(0, scale^2), for growing scales; scale 0 is the base model exactly (agreement 100%, KL 0);
- the same weights in the other precision (float32 for a bfloat16 run, bfloat16 for a float32 one).

Beside them, the trained adapters' own points where their results exist in --figures: the default run
(metrics.json) and the trade-off study's points (tradeoff_study.json). The question: at a trained adapter's KL, is its
agreement lower than a random change of that KL gives, and how high can agreement be at all?

    python studies/agreement_floor.py                    # the embedded model on this machine
    python studies/agreement_floor.py --scales 0 0.01 0.03 --model smollm2-135m
    python studies/agreement_floor.py --trained-only     # after a new default run or trade-off study: nothing measured

Outputs go to --figures: agreement_floor.json, agreement_floor.md (the table) and agreement_floor.png (agreement
against KL, Wilson 95% CIs). Any other flag goes to the pipeline (--model, --dtype, --eval-batch-size, --seed, ...).
"""
import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import introspection_experiment as ie  # noqa: E402
import machinery
from machinery import fastpath, models, report, rundir

log = logging.getLogger("study")
DEFAULT_SCALES = [0.0, 0.001, 0.003, 0.006, 0.01, 0.015, 0.02, 0.03]


def random_adapter(model, cfg: ie.Config, scale: float):
    """`model` wrapped in a LoRA adapter of the training's shape, B ~ N(0, scale^2) (seeded by cfg.seed), in eval mode."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(cfg.seed)
    with torch.device(models.input_device(model)):
        peft_model = get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                                      target_modules=ie.LORA_TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale) if scale else p.zero_()
    return peft_model.eval()


def comparison(tok, answers: list[str], base: list[str], kl: list[list[float]]) -> dict:
    """Agreement with the base answers (Wilson CI) and the mean per-token KL, as the capability benchmark states them."""
    agrees = [ie.agree(a, b, tok) for a, b in zip(answers, base)]
    kl_sum, tokens = (sum(col) for col in zip(*kl))
    return {"agreement": ie.rate(sum(agrees), len(agrees)), "kl": kl_sum / tokens}


def measure(cfg: ie.Config, scales: list[float]) -> dict:
    model, tok, info = models.load_model(cfg)
    prompts = [p["prompt"] for p in ie.ordinary_prompts()["heldout"]]

    def answers_of(m) -> list[list[int]]:
        with fastpath.cuda_fast_path(m, cfg):
            return ie.greedy_answers(m, tok, prompts, cfg, ie.CAPABILITY_TOKENS)

    base_ids = answers_of(model)
    base = ie.decode_answers(tok, base_ids)
    rows = []
    for scale in machinery.progress(scales, "random adapters"):
        peft_model = random_adapter(model, cfg, scale)
        answers = ie.decode_answers(tok, answers_of(peft_model))
        rows.append({"change": "random LoRA", "scale": scale,
                     **comparison(tok, answers, base, ie.answer_kl(peft_model, tok, prompts, base_ids, cfg))})
        log.info("random LoRA, B ~ N(0, %g^2): agreement %s, KL %.4f", scale, report.pct(rows[-1]["agreement"]), rows[-1]["kl"])
        model = peft_model.unload()
    other = "float32" if info["dtype"] != "float32" else "bfloat16"
    twin, _, _ = models.load_model(dataclasses.replace(cfg, dtype=other))
    answers = ie.decode_answers(tok, answers_of(twin))
    rows.append({"change": f"the same weights in {other}", "scale": None,
                 **comparison(tok, answers, base, ie.answer_kl(twin, tok, prompts, base_ids, cfg, base=model))})
    log.info("the same weights in %s: agreement %s, KL %.4f", other, report.pct(rows[-1]["agreement"]), rows[-1]["kl"])
    return {"model": report.model_label(info) + (" — RANDOM WEIGHTS" if info["random_weights"] else ""),
            "dtype": info["dtype"], "hardware": rundir.environment()["gpu"] or "CPU", "seed": cfg.seed,
            "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "modules": ie.LORA_TARGETS},
            "prompts": len(prompts), "answer_tokens": ie.CAPABILITY_TOKENS, "rows": rows}


def trained_points(figures: Path) -> list[dict]:
    """The trained adapters' agreement and KL from the default run's metrics.json and the trade-off study's points."""
    points = []
    metrics = rundir.read_json_or_none(figures / "metrics.json")
    if metrics and "capability" in metrics:
        cap = metrics["capability"]
        lm = metrics["settings"]["language_modelling"]
        points.append({"source": f"default run ({metrics['model']['device'].upper()})",
                       "label": f"{lm['replay']:g}:{lm['kl_weight']:g}:{lm['continue_examples']:g}",
                       "agreement": cap["agreement"], "kl": cap["answer_kl"]["mean_per_token"]})
    study = rundir.read_json_or_none(figures / "tradeoff_study.json")
    for p in (study or {}).get("points", []):
        if p["replay"] or p["kl_weight"]:  # the paper's recipe (no replay, no KL) lies far off the scale
            points.append({"source": f"trade-off study ({', '.join(study['hardware'])})",
                           "label": ("word " if p["protocol"].startswith("word") else "")
                                    + f"{p['replay']:g}:{p['kl_weight']:g}:{p['continue_examples']:g}"
                                    + (":neg" if p["kl_negatives"] else ""),
                           "agreement": p["agreement with base"], "kl": p["KL (nats/token)"]})
    return points


def floor_table(result: dict) -> str:
    intro = (f"Model: {result['model']} ({result['dtype']}) on {result['hardware']}; seed {result['seed']}; "
             f"{result['prompts']} held-out ordinary prompts, first {result['answer_tokens']} greedy tokens; random LoRA "
             f"adapters of rank {result['lora']['rank']}, alpha {result['lora']['alpha']} on "
             f"{', '.join(result['lora']['modules'])}; no training. Trained adapters from their own runs.")
    rows = [[r["change"] + (f", B ~ N(0, {r['scale']:g}²)" if r["scale"] is not None else ""), report.pct(r["agreement"]),
             f"{r['kl']:.4f}"] for r in result["rows"]]
    rows += [[f"trained: {p['source']}, {p['label']}", report.pct(p["agreement"]), f"{p['kl']:.4f}"] for p in result["trained"]]
    return intro + "\n\n" + report.markdown_table(["change to the model", "agreement with base", "KL (nats/token)"], rows)


def plot_floor(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    floor = [r for r in result["rows"] if r["scale"] is not None and r["kl"] > 0]
    if floor:
        ax.errorbar([r["kl"] for r in floor], [100 * r["agreement"]["rate"] for r in floor],
                    yerr=report.ci_err([r["agreement"] for r in floor]) * 100, fmt="o-", color="0.4", capsize=2,
                    label="random LoRA (no training)")
    for r in result["rows"]:
        if r["scale"] is None:
            ax.errorbar([r["kl"]], [100 * r["agreement"]["rate"]], yerr=report.ci_err([r["agreement"]]) * 100, fmt="*",
                        markersize=11, color="C3", capsize=2, label=r["change"])
    for i, source in enumerate(dict.fromkeys(p["source"] for p in result["trained"])):
        pts = [p for p in result["trained"] if p["source"] == source]
        ax.errorbar([p["kl"] for p in pts], [100 * p["agreement"]["rate"] for p in pts],
                    yerr=report.ci_err([p["agreement"] for p in pts]) * 100, fmt="Ds"[i % 2], color=f"C{i}", capsize=2,
                    markersize=4 + 4 * (i % 2 == 0 and len(pts) == 1), zorder=3 + (len(pts) == 1),
                    label=f"trained: {source}")
        for p in pts:
            ax.annotate(p["label"], (p["kl"], 100 * p["agreement"]["rate"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(75, color="k", linestyle=":", linewidth=1, label="issue goal: agreement 75%")
    ax.set_xscale("log")
    ax.set_xlabel("mean KL(base ‖ changed model), nats per answer token")
    ax.set_ylabel("agreement with base, first 16 tokens (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"Agreement noise floor — {result['model']} ({result['dtype']}) on {result['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", default="figures", help="where the JSON, table and figure go (and the trained "
                                                              "points are read from)")
    parser.add_argument("--scales", type=float, nargs="+", default=DEFAULT_SCALES,
                        help="standard deviations of the random LoRA B matrices (0: the base model exactly)")
    parser.add_argument("--trained-only", action="store_true", help=(
        "measure nothing: re-read the trained points (after a new default run or trade-off study) into the existing "
        "agreement_floor.json and rewrite its table and figure"))
    return parser


def main(argv=None) -> int:
    def action():
        args, pipeline_args = build_parser().parse_known_args(argv)
        if any(not s >= 0 for s in args.scales):
            raise machinery.ConfigError("--scales must be >= 0")
        if "--model" not in pipeline_args:
            pipeline_args = ["--model", models.EMBEDDED_MODEL, *pipeline_args]
        cfg = ie.resolve_config(ie.config_from_args(pipeline_args))
        figures = Path(args.figures)
        figures.mkdir(parents=True, exist_ok=True)
        if args.trained_only:
            measured = rundir.read_json_or_none(figures / "agreement_floor.json")
            if measured is None:
                raise machinery.ConfigError(f"--trained-only needs a finished {figures / 'agreement_floor.json'}")
        else:
            measured = measure(cfg, args.scales)
        result = {**measured, "trained": trained_points(figures)}
        rundir.write_json(figures / "agreement_floor.json", result)
        (figures / "agreement_floor.md").write_text(floor_table(result) + "\n")
        plot_floor(result, figures / "agreement_floor.png")
        log.info("Agreement floor:\n%s", floor_table(result))

    return machinery.cli(action)  # the pipeline's logging; bad input one line and exit 2, Ctrl-C exit 130


if __name__ == "__main__":
    sys.exit(main())
