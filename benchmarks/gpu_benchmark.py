#!/usr/bin/env python3
"""GPU benchmark: the paper-scale pipeline on random weights of DeepSeek-LLM-7B's exact shape.

Runs `introspection_experiment.run` end to end with the paper's hyperparameters (concept vectors for 60 concepts + 32
baseline words, base-model evaluation, 3 LoRA epochs of 480 examples at effective batch 4, fine-tuned evaluation, the
safety stage), then measures steady-state LoRA training throughput at micro-batches 4 and 32 (the epoch after graph
capture and warm-up). Prints a table per stage (items, seconds, items/s, training tokens/s, MFU, peak GPU memory) and
writes it as JSON. Process setup (imports, CUDA library initialisation) and model creation are timed and reported but
not part of the total; the capability-retention stages are timed but listed apart (not in the paper's workload).
Any other flag goes to the pipeline (`--recipe paper`, `--replay 0.5`, ...); the default is the pipeline's default
recipe. The training rows count every example trained on (introspection, replay and report-then-continue rows).

FLOP count: LoRA training costs 4·N + 6·L FLOPs per real (non-padding) token: each of the N frozen weights in
matrix products (decoder linears + LM head = 6.49e9 for DeepSeek-7B) does 2 in the forward pass and 2 in the
backward pass through the activations (frozen weights get no gradient); each of the L LoRA weights (3.15e7) does
those 4 and 2 more for its weight gradient; attention scores are ignored (<0.2% at these lengths).
MFU = FLOPs / seconds / peak, with peak = 989 TFLOP/s (H100 SXM dense bf16).

    python benchmarks/gpu_benchmark.py --output benchmarks/h100_bf16.json
    python benchmarks/gpu_benchmark.py --output benchmarks/h100_4bit.json --load-in-4bit

A split model (the script's --device-map / --max-gpu-memory, passed through): two GPUs, or one GPU and CPU offload.
Its random weights are drawn on the CPU, so they differ from the unsplit rows'; peak memory is the fullest GPU's.

    python benchmarks/gpu_benchmark.py --output benchmarks/h200x2_split_bf16.json --device-map balanced
    python benchmarks/gpu_benchmark.py --output benchmarks/h200_gpu_cpu_bf16.json --max-gpu-memory 8GiB
"""
import argparse
import dataclasses
import gc
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import introspection_experiment as ie  # noqa: E402
import machinery  # noqa: E402
from machinery import fastpath, models, rundir

PEAK_FLOPS = 989e12
log = logging.getLogger("benchmark")


def sync() -> None:
    rundir.synchronize_gpus()


def peak_gib():
    return rundir.peak_gpu_gib() if torch.cuda.is_available() else None


def training_tokens(examples: list[dict]) -> int:
    """Real (non-padding) tokens of tokenized training examples."""
    return sum(len(e["prompt"]) + len(e["completion"]) for e in examples)


def flops_per_token(model, cfg: ie.Config) -> int:
    """4 FLOPs per frozen matmul weight (forward + input gradient) and 6 per LoRA weight (+ weight gradient)."""
    lora = sum(cfg.lora_rank * (m.in_features + m.out_features) for name, m in models.decoder_layers(model).named_modules()
               if name.rsplit(".", 1)[-1] in ie.LORA_TARGETS)
    return 4 * models.matmul_weights(model) + 6 * lora


def trained_examples(run_dir: Path, cfg: ie.Config, tok, stage: str) -> list[dict]:
    """The examples a training stage trained on, tokenized: the safety dataset, or the introspection dataset with the
    run's replay and report-then-continue rows (rebuilt from the cached base answers, as the run built them)."""
    from datasets import load_from_disk
    if stage == "safety_train":
        return ie.tokenize_examples(load_from_disk(str(run_dir / "safety_dataset")), tok, cfg.prompt_format)
    dataset = load_from_disk(str(run_dir / "dataset"))
    train_concepts = json.loads((run_dir / "metrics.json").read_text())["concepts"]["train"]
    answers = list(load_from_disk(str(run_dir / "replay_answers"))) if (run_dir / "replay_answers").exists() else []
    rows = ie.replay_and_continue_rows(answers, cfg, len(dataset), train_concepts, cfg.train_strengths, tok)
    return ie.tokenize_examples(ie.training_set(dataset, rows), tok, cfg.prompt_format, cfg.kl_negatives)


def stage_rows(run_dir: Path, cfg: ie.Config, flops: int, tok) -> list[dict]:
    """One row per pipeline stage, from the run's timings, trials and datasets (`cfg` resolved as the run did)."""
    from datasets import load_from_disk
    times = json.loads((run_dir / "timings.json").read_text())
    trials = rundir.read_jsonl(run_dir / "trials.jsonl")
    n_concepts = len(ie.TRAIN_CONCEPTS) + len(ie.HELDOUT_CONCEPTS)
    rows = []
    for stage in [k for k in times if not k.endswith("_peak_gib") and k != "load_model"]:
        row = {"stage": stage, "seconds": times[stage], "peak_gib": times.get(f"{stage}_peak_gib")}
        if stage in ("train", "safety_train"):
            examples = trained_examples(run_dir, cfg, tok, stage)
            tokens = training_tokens(examples) * cfg.epochs
            adapter = "adapter" if stage == "train" else "safety_adapter"
            steps = len(json.loads((run_dir / f"{adapter}_train_log.json").read_text()))  # the run's optimizer steps
            row.update(items=len(examples) * cfg.epochs, unit="examples", tokens=tokens,
                       tokens_per_s=tokens / times[stage], mfu=flops * tokens / times[stage] / PEAK_FLOPS,
                       step_ms=1000 * times[stage] / steps)
        elif stage.startswith("capability_"):
            row.update(items=len(ie.ordinary_prompts()["heldout"]) + len(ie.exact_answers()),
                       unit="held-out + exact-answer prompts + prose")
        elif stage == "replay_answers":
            row.update(items=len(load_from_disk(str(run_dir / stage))), unit="base answers")
        elif stage.startswith("eval_"):
            row.update(items=eval_items(stage, trials),
                       unit="probe trials" if stage.endswith("_probe") else "generations")
        else:
            row.update(items=(n_concepts if stage == "concept_vectors" else
                              sum(map(len, ie.SAFETY_CATEGORIES.values()))) + len(ie.BASELINE_WORDS), unit="prompts")
        row["items_per_s"] = row["items"] / row["seconds"]
        rows.append(row)
    return rows


def eval_items(stage: str, trials: list[dict]) -> int:
    """The trials an evaluation stage `eval_<experiment>_<state>` produced (experiment and state may hold '_')."""
    return sum(stage == f"eval_{t['experiment']}_{t['state']}" for t in trials)


def throughput(cfg: ie.Config, micro_batches: list[int]) -> list[dict]:
    """LoRA training at each micro-batch on one fresh model, 2 epochs each: the second epoch, after graph capture and
    warm-up, is timed (steady state). Peak memory covers both epochs."""
    gc.collect()  # the pipeline's model, kept alive by reference cycles, must not count in the peaks
    model, tok, _ = models.load_model(cfg)
    cfg = dataclasses.replace(ie.resolve_config(cfg), grad_accum=1, epochs=2)
    vectors = dict(zip(ie.TRAIN_CONCEPTS, ie.random_directions(len(ie.TRAIN_CONCEPTS), models.text_config(model).hidden_size,
                                                               0).values()))
    dataset = ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60", "80", "100"], cfg.positives_per_concept, cfg.seed)
    tokens = training_tokens(ie.tokenize_examples(dataset, tok, cfg.prompt_format))
    flops = flops_per_token(model, cfg)
    rows = []
    with fastpath.cuda_fast_path(model, cfg):  # the run's CUDA speed-ups, as in ie.run
        for micro_batch in micro_batches:
            sync()
            rundir.reset_gpu_peaks()
            epochs = []  # train_lora's per-epoch records: wall time from collation to the losses read back (a device sync)
            trained, _ = ie.train_lora(model, tok, dataset, vectors, 1.0, dataclasses.replace(cfg, batch_size=micro_batch),
                                       on_epoch=epochs.append)
            model = trained.unload()
            seconds = epochs[-1]["seconds"]
            rows.append({"micro_batch": micro_batch, "examples": len(dataset), "tokens": tokens, "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "mfu": flops * tokens / seconds / PEAK_FLOPS,
                         "step_ms": 1000 * seconds / -(-len(dataset) // micro_batch), "peak_gib": peak_gib()})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON file to write")
    parser.add_argument("--model", default="random:deepseek-llm-7b")
    parser.add_argument("--load-in-4bit", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the embedded model's)")
    parser.add_argument("--throughput-batch", type=int, default=32, help="micro-batch of the MFU measurement (0: skip)")
    parser.add_argument("--epochs", type=int, default=3)
    for name in ("device_map", "max_gpu_memory"):  # the split options, as the script defines them
        field = next(f for f in dataclasses.fields(ie.Config) if f.name == name)
        parser.add_argument(machinery.flag(field), default=None, help=field.metadata["help"])
    args, pipeline_args = parser.parse_known_args()  # any other flag goes to the pipeline (e.g. --replay 0.5)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    warm_up()
    setup_s = time.perf_counter() - start
    if not torch.cuda.is_available():
        log.warning("no CUDA device: timings are CPU timings and MFU is meaningless")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(ie.config_from_args(pipeline_args), model=args.model, load_in_4bit=args.load_in_4bit,
                                  tokenizer=args.tokenizer, epochs=args.epochs, output_dir=str(Path(tmp) / "run"),
                                  device_map=args.device_map, max_gpu_memory=args.max_gpu_memory)
        start = time.perf_counter()
        loaded = models.load_model(cfg)
        sync()
        model_creation_s = time.perf_counter() - start
        flops = flops_per_token(loaded[0], cfg)
        metrics = ie.run(cfg, loaded)
        del loaded
        tok = models.load_tokenizer(args.tokenizer) if args.tokenizer else models.load_embedded_tokenizer()
        rows = stage_rows(Path(cfg.output_dir), ie.resolve_config(cfg), flops, tok)
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "model": args.model, "random_weights": True,
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
              "placement": metrics["model"]["placement"],
              "split": {"device_map": args.device_map, "max_gpu_memory": args.max_gpu_memory,
                        "cuda_fast_path_off": metrics["model"].get("cuda_fast_path_off")},
              "load_in_4bit": args.load_in_4bit, "dtype": metrics["model"]["dtype"],
              "pipeline_args": pipeline_args, "language_modelling": metrics["settings"]["language_modelling"],
              "settings": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                           "eval_batch_size": cfg.eval_batch_size, "max_new_tokens": cfg.max_new_tokens},
              "flops_per_token": flops, "flop_count": f"4 * N + 6 * L = {flops:.4g}, N = "
                                 f"{metrics['model']['matmul_weights']:.4g} frozen weights in matmuls (decoder linears + "
                                 "LM head), L LoRA weights; MFU vs 989 TFLOP/s",
              "environment": rundir.environment(), "setup_s": round(setup_s, 3),
              "model_creation_s": round(model_creation_s, 3),
              "stages": rows,
              "total_compute_s": sum(r["seconds"] for r in rows if not is_extra(r)),
              "extra_s": sum(r["seconds"] for r in rows if is_extra(r)),
              "peak_gib": max(r["peak_gib"] or 0 for r in rows)}
    if args.throughput_batch:
        result["throughput"] = throughput(dataclasses.replace(cfg, output_dir=None), sorted({4, args.throughput_batch}))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    return 0


TARGETS = {"total_s": 30.0, "mfu_32": 0.35, "peak_gib_bf16": 20.0, "peak_gib_4bit": 10.0}


def targets_line(results: list[dict]) -> str:
    """The targets of the GPU issue against these runs: every bf16 run's total and MFU at micro-batch 32, and the peak
    memory of each precision."""
    bf16 = [r for r in results if not r["load_in_4bit"]]
    nf4 = [r for r in results if r["load_in_4bit"]]
    mfu = [t["mfu"] for r in bf16 for t in r.get("throughput", []) if t["micro_batch"] == 32]

    def check(name, values, limit, above=False, fmt="{:.1f}"):
        ok = values and all(v >= limit if above else v <= limit for v in values)
        return f"{name} {'≥' if above else '≤'} {fmt.format(limit)}: {', '.join(fmt.format(v) for v in values)} " \
               f"{'met' if ok else 'NOT met'}"

    return "targets: " + "; ".join([
        check("bf16 total s", [r["total_compute_s"] for r in bf16], TARGETS["total_s"]),
        check("bf16 MFU at micro-batch 32 %", [100 * m for m in mfu], 100 * TARGETS["mfu_32"], above=True),
        check("bf16 peak GiB", [r["peak_gib"] for r in bf16], TARGETS["peak_gib_bf16"]),
        check("4-bit peak GiB", [r["peak_gib"] for r in nf4], TARGETS["peak_gib_4bit"])])


def is_extra(row: dict) -> bool:
    """Stages beyond the paper's workload (capability retention), timed but kept out of the total."""
    return row["stage"].startswith("capability_")


def warm_up() -> None:
    """Process setup before anything is timed, like model creation: the imports the pipeline makes lazily (peft,
    transformers' generation utilities, datasets, safetensors), the CUDA context, and cuBLAS, SDPA and fused-AdamW
    initialisation. A first call to each costs seconds in a fresh process."""
    import datasets  # noqa: F401
    import peft.helpers  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers import LogitsProcessorList, StaticCache  # noqa: F401
    if not torch.cuda.is_available():
        return
    x = torch.randn(8, 4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)
    (out.float() @ out.float().transpose(-1, -2)).sum().backward()
    torch.optim.AdamW([x], fused=True).step()
    sync()


def split_note(result: dict) -> str:
    """'; split over N devices (cuda:0, cuda:1)' for a row of a model on several devices, else '' (also for rows
    written before placements were recorded)."""
    placement = result.get("placement") or {"num_devices": 1}
    if placement["num_devices"] < 2:
        return ""
    return f"; split over {placement['num_devices']} devices ({', '.join(placement['devices'])})"


def format_table(result: dict) -> str:
    lines = [f"{result['device']} — {result['model']} (RANDOM WEIGHTS), "
             f"{'4-bit NF4' if result['load_in_4bit'] else result['dtype']}{split_note(result)}",
             f"{'stage':34} {'items':>12} {'seconds':>8} {'items/s':>9} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9}"]
    for r in result["stages"]:
        name = r["stage"] + (" (extra)" if is_extra(r) else "")
        lines.append(f"{name:34} {r['items']:>5} {r['unit'][:6]:6} {r['seconds']:8.2f} {r['items_per_s']:9.1f} "
                     f"{r.get('tokens_per_s', 0):9.0f} {100 * r.get('mfu', 0):5.1f}% {r['peak_gib'] or 0:9.2f}")
    lines.append(f"{'total (excluding model creation)':34} {'':12} {result['total_compute_s']:8.2f} "
                 f"{'':9} {'':9} {'':6} {result['peak_gib']:9.2f}")
    lines.append(f"not in the total: process setup (imports, CUDA initialisation) {result['setup_s']:.2f} s, "
                 f"model creation {result['model_creation_s']:.2f} s")
    if result.get("extra_s"):
        lines.append(f"(extra) capability retention, not part of the paper's workload nor of the total: "
                     f"{result['extra_s']:.2f} s")
    for t in result.get("throughput", []):
        lines.append(f"LoRA training at micro-batch {t['micro_batch']}: {t['step_ms']:.1f} ms/step, "
                     f"{t['tokens_per_s']:.0f} tokens/s, MFU {100 * t['mfu']:.1f}%, peak {t['peak_gib'] or 0:.2f} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
