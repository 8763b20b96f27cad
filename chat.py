#!/usr/bin/env python3
"""Try a finished run: one prompt, a concept injected or not, through the run's monitors.

    python chat.py --run-dir runs/<dir> "What is the capital of France?" [--inject fire --strength 1x]
    echo "Tell me a story." | python chat.py --run-dir runs/<dir> --vector-file direction.safetensors

Loads the run's base model (its config.json: the same model, layer, prompt format and injection mode) with its
introspection adapter (adapter/) and safety adapter (safety_adapter/, if the run has one), generates greedily with the
injection as in the run, and prints what each monitor did: the introspection adapter's report (graded like
report-then-continue) and its answer, the safety adapter's halt (at token k) or not, the run's probe p(harmful), and
the base model's answer. Every input is checked before the model loads: bad input is one line and exit code 2.
Like nanoGPT's sample.py beside train.py, this file uses the experiment (introspection_experiment.py's declared
names) and the machinery; the experiment never imports it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from introspection_experiment import (Config, generate_with_halt, grade_continue, injection_rows, parse_strength,
                                      probe_training_trials, resolve_alpha, resolve_config, responses, run_probe)
from machinery import ConfigError, OneLineParser, cli
from machinery.fastpath import cuda_fast_path
from machinery.models import load_model
from machinery.rundir import CONFIG_FILE, load_vectors, read_artifact, read_json_or_none, require_complete

def chat_parser() -> argparse.ArgumentParser:
    """The chat command's own flags; everything else (model, layer, prompt format, injection mode) is the run's."""
    parser = OneLineParser(prog="chat.py", description="Try a finished run's monitors.")
    parser.add_argument("prompt", nargs="?", help="the prompt; default: read from stdin")
    parser.add_argument("--run-dir", required=True, help="a finished run's directory (config.json, adapter/, ...)")
    parser.add_argument("--model", help="refuse unless the run is a run of this model")
    parser.add_argument("--inject", metavar="CONCEPT", help="inject this concept's vector (one of the run's vectors)")
    parser.add_argument("--vector-file", help="inject this [hidden] tensor (.safetensors or .pt, normed to 1) instead")
    parser.add_argument("--strength", default="1x", help="a norm multiple (1x) or an absolute alpha; default 1x")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per answer; default 64")
    return parser


def finished_run(run_dir: Path, model: str | None) -> tuple[Config, dict, dict[str, torch.Tensor], float]:
    """(resolved config, metrics, concept vectors incl. the safety stage's, typical norm at L) of the finished run in
    `run_dir`; refused in one line unless it has a run config (of `model`, if given), metrics complete and adapter/."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    saved = read_artifact(run_dir / CONFIG_FILE, lambda p: json.loads(p.read_text()))
    try:
        cfg = resolve_config(Config(**saved["config"]))
    except (TypeError, KeyError):
        raise ConfigError(f"{run_dir / CONFIG_FILE} is not a run config of this script") from None
    if model is not None and model != cfg.model:
        raise ConfigError(f"{run_dir} is a run of {cfg.model}, not of --model {model}")
    if (metrics := read_json_or_none(run_dir / "metrics.json")) is None:
        raise ConfigError(f"{run_dir} has no readable metrics.json: its run did not finish; rerun its command")
    if not (run_dir / "adapter").is_dir():
        raise ConfigError(f"{run_dir} has no adapter/: there is no trained adapter to try")
    vectors, meta = read_artifact(run_dir / "vectors.safetensors", load_vectors)
    safety = run_dir / "safety_vectors.safetensors"
    extra = read_artifact(safety, load_vectors)[0] if safety.exists() else {}
    vectors = {**vectors, **{c: v for c, v in extra.items() if c not in vectors}}  # the run's concepts first
    return cfg, require_complete(metrics, run_dir / "metrics.json"), vectors, meta["typical_norm"]


def read_vector_file(path: Path, dim: int) -> torch.Tensor:
    """The one finite, nonzero [dim] tensor of a .safetensors or .pt file (weights_only), normed to 1; else refused."""
    from safetensors.torch import load_file
    try:
        found = (list(load_file(str(path)).values()) if path.suffix == ".safetensors"
                 else [torch.load(path, map_location="cpu", weights_only=True)] if path.suffix == ".pt" else [])
    except Exception:  # whatever the reader raises on a missing or damaged file
        found = []
    vector = found[0].float() if len(found) == 1 and isinstance(found[0], torch.Tensor) else None
    if vector is None or vector.shape != (dim,) or not torch.isfinite(vector).all() or not vector.norm() > 0:
        raise ConfigError(f"--vector-file {path} must be a readable .safetensors or .pt file holding one finite, "
                          f"nonzero [{dim}] tensor (the run's hidden size)")
    return vector / vector.norm()


def chat_trial(args, train_concepts: list[str], vectors: dict[str, torch.Tensor]) -> dict:
    """The prompt as an evaluation trial (split, concept, strength, question); a --vector-file direction is added to
    `vectors` as 'vector-file'. Bad input is refused here, before the model loads."""
    question = (args.prompt if args.prompt is not None else sys.stdin.read()).strip()
    if not question or args.max_new_tokens < 1 or (args.inject and args.vector_file):
        raise ConfigError("chat: give a prompt (argument or stdin), --max-new-tokens >= 1 and at most one of --inject "
                          "and --vector-file")
    parse_strength(args.strength)
    if args.vector_file:
        vectors["vector-file"] = read_vector_file(Path(args.vector_file), len(next(iter(vectors.values()))))
    elif args.inject and args.inject not in vectors:
        raise ConfigError(f"chat: unknown concept {args.inject!r}: this run has vectors for "
                          f"{', '.join(list(vectors)[:8])}, ... ({len(vectors)} in all), or give --vector-file")
    concept = "vector-file" if args.vector_file else args.inject
    split = ("no-injection" if concept is None else "random" if args.vector_file
             else "seen" if concept in train_concepts else "held-out")
    return {"split": split, "concept": concept, "strength": args.strength if concept else None, "question": question}


def load_run_model(cfg: Config, run_dir: Path) -> tuple:
    """(model, tok): the run's base model (load_model(cfg): the same weights) in a PeftModel holding the run's adapters
    'introspection' (adapter/) and 'safety' (safety_adapter/, if any); disable_adapter() gives the base model."""
    from peft import PeftModel
    model, tok, _ = load_model(cfg)
    peft_model = PeftModel.from_pretrained(model, str(run_dir / "adapter"), adapter_name="introspection")
    if (run_dir / "safety_adapter").is_dir():
        peft_model.load_adapter(str(run_dir / "safety_adapter"), adapter_name="safety")
    return peft_model.eval(), tok


def chat_answers(model, tok, cfg: Config, trial: dict, vectors: dict[str, torch.Tensor], typical_norm: float) -> dict:
    """What each monitor did with the trial (greedy, cfg.max_new_tokens, injected as in the run): the base answer,
    the introspection adapter's graded by grade_continue (report, verdict, agreement), the safety adapter's halt and
    the run's probe (run_probe, deterministic: p(harmful) and its verdict at run_probe's threshold)."""
    vecs, alphas = injection_rows([trial], vectors, typical_norm)
    def answer(respond=responses) -> dict:
        return respond(model, tok, [trial["question"]], vecs, alphas, cfg, False, None, cfg.max_new_tokens)[0]
    with model.disable_adapter():
        out = {"base": answer()["response"]}
        if "safety" in model.peft_config:  # the probe reads the base model, as in the run
            out["probe"] = run_probe(model, tok, probe_training_trials(cfg.train_strengths), [trial], vectors,
                                     typical_norm, cfg, "chat")[0]
    model.set_adapter("introspection")
    out["introspection"] = (intro := answer()) | grade_continue(trial, intro["response"], out["base"], tok)
    if "safety" in model.peft_config:
        model.set_adapter("safety")
        out["safety"] = answer(generate_with_halt)
    return out


def chat_text(trial: dict, typical_norm: float, out: dict) -> str:
    """The chat command's printout: the prompt and the injection, then one section per monitor, the base model last."""
    def flat(text: str) -> str:
        return " ".join(text.split()) or "(nothing)"
    intro, safety = out["introspection"], out.get("safety")
    injected = (f"{trial['concept']} at {trial['strength']} (alpha {resolve_alpha(trial['strength'], typical_norm):.4g}"
                f", {trial['split']})" if trial["concept"] else "nothing")
    return "\n".join([
        f"prompt: {flat(trial['question'])}", f"injected: {injected}",
        "[introspection adapter] " + (f"reported {intro['report']!r}" if intro["report"] else "no report")
        + f": {intro['verdict']}; then {'agrees with' if intro['agrees'] else 'differs from'} the base answer",
        f"  answer: {flat(intro['response'])}",
        "[safety adapter] " + ("none in this run (--skip-safety)" if safety is None else f"halted at token "
                               f"{safety['halt_latency']}" if safety["halted"] else "proceeded (no halt)"),
        *([f"  answer: {flat(safety['response'])}", f"[probe] p(harmful) {out['probe']['p_harmful']:.3f}: "
           f"{out['probe']['verdict']}"] if safety else []), f"[base model] {flat(out['base'])}"])


def chat(argv: list[str]) -> None:
    """The chat command: every input is checked before the model loads; then the answers of the monitors, printed."""
    args = chat_parser().parse_args(argv)
    cfg, metrics, vectors, typical_norm = finished_run(Path(args.run_dir), args.model)
    cfg = dataclasses.replace(cfg, max_new_tokens=args.max_new_tokens)
    trial = chat_trial(args, metrics.get("concepts", {}).get("train", []), vectors)
    model, tok = load_run_model(cfg, Path(args.run_dir))
    with cuda_fast_path(model, cfg):
        print(chat_text(trial, typical_norm, chat_answers(model, tok, cfg, trial, vectors, typical_norm)), flush=True)


def main(argv: list[str] | None = None) -> int:
    return cli(lambda: chat(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
