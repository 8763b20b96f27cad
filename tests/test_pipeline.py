"""Configuration, bad input, model plumbing, dataset, and end-to-end runs."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import introspection_experiment as ie

ROOT = Path(__file__).resolve().parents[1]
SMALL_CONCEPTS = {"train": ["fire", "ocean", "king", "storm"], "heldout": ["volcano", "galaxy"],
                  "baseline": ["table", "chair", "road", "cloud"]}
TINY_ARGS = ["--model", "random:tiny", "--dtype", "float32", "--epochs", "1", "--positives-per-concept", "2",
             "--max-new-tokens", "4", "--control-trials", "4", "--random-vectors", "2", "--eval-strengths", "40", "1x",
             "--safety-examples-per-class", "8"]


def concepts_file(tmp_path, concepts=SMALL_CONCEPTS):
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps(concepts))
    return str(path)


def run_main(args, caplog):
    caplog.clear()
    code = ie.main(args)
    return code, caplog.text


# --- CLI and bad input -----------------------------------------------------------------------------------------------

def test_help_documents_every_config_field():
    out = subprocess.run([sys.executable, str(ROOT / "introspection_experiment.py"), "--help"], capture_output=True,
                         text=True, check=True).stdout
    for name in ie.Config.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in out


def test_default_model_falls_back_to_embedded_without_cuda(caplog):
    cfg = ie.config_from_args([])
    if torch.cuda.is_available():
        assert cfg.model == ie.PAPER_MODEL
    else:
        assert cfg.model == ie.EMBEDDED_MODEL and "No CUDA device" in caplog.text
    assert ie.config_from_args(["--model", "some/model"]).model == "some/model"


@pytest.mark.parametrize("extra,message", [
    (["--model", "no-such-org/no-such-model-xyz"], "cannot load model 'no-such-org/no-such-model-xyz'"),
    (["--model", "random:huge"], "unknown random shape"),
    (["--model", "random:tiny", "--layer", "4"], "out of range"),
    (["--model", "random:tiny", "--layer", "-1"], "out of range"),
    (["--model", "random:tiny", "--train-strengths", "strong"], "bad strength"),
    (["--model", "random:tiny", "--epochs", "0"], "--epochs must be >= 1"),
    (["--model", "random:tiny", "--random-negatives", "1.5"], "between 0 and 1"),
    (["--model", "random:tiny", "--num-train-concepts", "100000"], "exceeds the"),
    (["--model", "random:tiny", "--seeds", "1", "1"], "must not repeat"),
])
def test_bad_input_is_one_clear_error(tmp_path, caplog, extra, message):
    code, text = run_main(extra + ["--output-dir", str(tmp_path / "run")], caplog)
    assert code == 2 and message in text and "Traceback" not in text
    assert not (tmp_path / "run" / "vectors.safetensors").exists()


@pytest.mark.parametrize("concepts,message", [
    ({"train": []}, "non-empty"),
    ({"train": ["fire", "fire"]}, "duplicate concept 'fire'"),
    ({"heldout": ["fire"]}, "duplicate concept 'fire'"),
    ({"colours": ["red"]}, "keys must be"),
])
def test_bad_concept_lists(tmp_path, caplog, concepts, message):
    code, text = run_main(["--model", "random:tiny", "--concepts-file", concepts_file(tmp_path, concepts),
                           "--output-dir", str(tmp_path / "run")], caplog)
    assert code == 2 and message in text


def test_unwritable_output_dir(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, text = run_main(["--model", "random:tiny", "--output-dir", str(blocker / "run")], caplog)
    assert code == 2 and "not writable" in text


@pytest.mark.parametrize("flags", [["--dtype", "float16"], ["--load-in-4bit"]])
def test_missing_gpu_for_gpu_only_option(caplog, tmp_path, flags):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    code, text = run_main(["--model", "random:tiny", *flags, "--output-dir", str(tmp_path)], caplog)
    assert code == 2 and "needs a CUDA GPU" in text and "Traceback" not in text


# --- model plumbing --------------------------------------------------------------------------------------------------

def build(config_cls, **extra):
    from transformers import AutoModelForCausalLM
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, **extra)
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_decoder_layers_found_plain_and_peft_wrapped(family):
    import transformers
    from peft import LoraConfig, get_peft_model
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig}[family]
    model = build(config_cls)
    layers = ie.decoder_layers(model)
    assert len(layers) == 3
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=ie.LORA_TARGETS, task_type="CAUSAL_LM"))
    assert ie.decoder_layers(wrapped) is layers
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        clean = wrapped(input_ids=ids).logits
        with ie.injection(wrapped, 1, torch.ones(1, 32), torch.tensor([5.0]), torch.tensor([3])):
            edited = wrapped(input_ids=ids).logits
    assert torch.equal(clean[:, :3], edited[:, :3]) and not torch.equal(clean[:, 3], edited[:, 3])


def test_random_shape_with_a_saved_tokenizer(tmp_path, tok):
    tok.save_pretrained(tmp_path / "tok")
    model, loaded, info = ie.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "tok"), dtype="float32"))
    assert info["random_weights"] and loaded("Hi").input_ids == tok("Hi").input_ids
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    with pytest.raises(ie.ConfigError, match="cannot load tokenizer"):
        ie.load_model(ie.Config(model="random:tiny", tokenizer=str(tmp_path / "missing")))


def test_deepseek_shape_is_the_real_one():
    from transformers import AutoModelForCausalLM, LlamaConfig
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**ie.RANDOM_SHAPES["deepseek-llm-7b"]))
    assert sum(p.numel() for p in model.parameters()) == 6_910_365_696  # DeepSeek-LLM-7B's parameter count
    assert ie.num_layers(model) == 30 and ie.resolve_layer(ie.Config(), model) == 20


def test_hook_follows_the_layer_device():
    """With device_map="auto" a layer may live on another device than the inputs: the edit is built there."""
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    seen = []
    with ie.injection(model, 1, torch.ones(1, 16), torch.tensor([2.0]), torch.tensor([2])):
        hook = next(iter(ie.decoder_layers(model)[1]._forward_pre_hooks.values()))
        hidden = torch.zeros(1, 3, 16, device="meta")  # stands in for a second device
        args, _ = hook(None, (hidden,), {})
        seen.append(args[0].device)
    assert seen == [torch.device("meta")]


def test_controls_battery_trials():
    cfg = ie.Config(control_trials=12)
    trials = ie.build_trials({"train": ["fire"], "heldout": ["volcano", "galaxy"]}, ["40", "1x"], ["random-00"], cfg)
    by_split = {s: [t for t in trials if t["split"] == s] for s in {t["split"] for t in trials}}
    assert [t["concept"] for t in by_split["negated"]] == ["-volcano", "-volcano", "-galaxy", "-galaxy"]
    yes_no = by_split["yes-no"]
    assert len(yes_no) == 3 * len(ie.YES_NO_QUESTIONS)
    assert sum(t["concept"] is None for t in yes_no) == len(ie.YES_NO_QUESTIONS)
    assert {t["concept"] for t in yes_no} - {None} == {"volcano", "galaxy"}
    assert len({t["question"] for t in by_split["control"]}) == 12  # 5 training + 7 unseen phrasings
    assert ie.SAMPLED_SPLITS == {"control", "none"}


def test_length_buckets_cover_every_example_once():
    examples = [{"prompt": [0] * (i % 7 + 1), "completion": [0] * (i % 3 + 1)} for i in range(100)]
    batches = ie.length_bucketed_batches(examples, 8, torch.Generator().manual_seed(0))
    assert sorted(i for b in batches for i in b) == list(range(100)) and max(map(len, batches)) == 8
    spread = [max(len(examples[i]["prompt"]) + len(examples[i]["completion"]) for i in b)
              - min(len(examples[i]["prompt"]) + len(examples[i]["completion"]) for i in b) for b in batches]
    assert sum(spread) / len(spread) < 3  # random batches of these lengths differ by ~6


def test_default_layer_is_two_thirds_depth(tok):
    from transformers import LlamaConfig, LlamaForCausalLM
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert ie.resolve_layer(ie.Config(), model) == 20


def test_prompt_tokens_are_a_prefix_of_training_sequence(tok):
    for fmt in ("paper", "chat"):
        prompt = ie.format_prompt(ie.DETECTION_QUESTIONS[0], tok, fmt)
        ids = ie.encode(prompt, tok, fmt)
        full = tok(prompt + ie.POSITIVE_COMPLETION.format(concept="fire").lstrip(" " if fmt == "chat" else ""),
                   add_special_tokens=fmt == "paper").input_ids
        assert full[:len(ids)] == ids
        assert ie.completion_ids(ie.NEGATIVE_COMPLETION, tok, fmt)[-1] == tok.eos_token_id


def test_word_token_index_points_at_the_concept(tok):
    text = ie.format_prompt(ie.EXTRACTION_QUESTION.format(word="avalanche"), tok, "paper")
    index = ie.word_token_index(text, "avalanche", tok, "paper")
    ids = ie.encode(text, tok, "paper")
    assert tok.decode(ids[:index + 1]).endswith("avalanche") and not tok.decode(ids[:index]).endswith("avalanche")


# --- dataset ---------------------------------------------------------------------------------------------------------

def test_dataset_balance_and_size():
    ds = ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60", "80", "100"], 6, seed=0)
    assert len(ds) == 480 and sum(ds["injected"]) == 240
    for concept in ie.TRAIN_CONCEPTS:
        strengths = [r["strength"] for r in ds if r["concept"] == concept]
        assert len(strengths) == 6 and set(strengths) == {"40", "60", "80", "100"}
    assert set(ds["question"]) == set(ie.DETECTION_QUESTIONS)
    negatives = [r for r in ds if not r["injected"]]
    assert all(r["completion"] == ie.NEGATIVE_COMPLETION and r["strength"] == "" for r in negatives)


def test_random_negatives_replace_part_of_the_negatives():
    names = list(ie.random_directions(60, 8, seed=0, prefix="train-random"))
    ds = ie.build_dataset(ie.TRAIN_CONCEPTS, ["1x", "2x"], 3, seed=0, random_negatives=names)
    positives = [r for r in ds if r["completion"] != ie.NEGATIVE_COMPLETION]
    negatives = [r for r in ds if r["completion"] == ie.NEGATIVE_COMPLETION]
    assert len(positives) == len(negatives) == 120
    with_direction = [r for r in negatives if r["concept"]]
    assert sorted(r["concept"] for r in with_direction) == sorted(names)  # each direction used once, labelled "no"
    assert all(r["injected"] and r["strength"] in ("1x", "2x") for r in with_direction)
    assert sum(r["strength"] == "1x" for r in with_direction) == 30  # stratified over the training strengths
    assert all(not r["injected"] and r["strength"] == "" for r in negatives if not r["concept"])


def test_random_directions_unit_norm_and_independent_streams():
    evaluation = ie.random_directions(3, 16, seed=0)
    training = ie.random_directions(3, 16, seed=0, prefix="train-random")
    assert list(evaluation) == ["random-000", "random-001", "random-002"]
    for v in [*evaluation.values(), *training.values()]:
        assert abs(float(v.norm()) - 1) < 1e-5
    assert not torch.allclose(evaluation["random-000"], training["train-random-000"])
    assert torch.equal(evaluation["random-001"], ie.random_directions(3, 16, seed=0)["random-001"])


def test_vocabulary_is_large_balanced_and_disjoint_from_the_paper_lists():
    words = ie.vocabulary()
    categories = json.loads(ie.VOCABULARY_FILE.read_text())["categories"]
    assert len(words) >= 500 and len(set(words)) == len(words) == sum(map(len, categories.values()))
    reserved = set(ie.TRAIN_CONCEPTS + ie.HELDOUT_CONCEPTS + ie.BASELINE_WORDS)
    reserved |= {w for ws in ie.SAFETY_CATEGORIES.values() for w in ws}
    assert not reserved & set(words)
    first = words[:len(categories)]  # interleaved: the first words cover every category once
    assert {next(c for c, ws in categories.items() if w in ws) for w in first} == set(categories)


def test_num_train_concepts_extends_the_paper_list_with_the_vocabulary():
    concepts = ie.load_concepts(ie.Config(num_train_concepts=100))
    assert concepts["train"][:40] == ie.TRAIN_CONCEPTS and concepts["train"][40:] == ie.vocabulary()[:60]
    assert ie.load_concepts(ie.Config(num_train_concepts=10))["train"] == ie.TRAIN_CONCEPTS[:10]
    assert concepts["heldout"] == ie.HELDOUT_CONCEPTS


def test_seeds_flag_parses_to_ints():
    assert ie.config_from_args(["--seeds", "0", "1", "2"]).seeds == [0, 1, 2]


def test_dataset_is_seeded():
    a = ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=1).to_list()
    assert a == ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=1).to_list()
    assert a != ie.build_dataset(ie.TRAIN_CONCEPTS, ["40", "60"], 3, seed=2).to_list()


def test_collate_masks_prompt_and_injects_at_last_prompt_token(tok):
    examples = ie.tokenize_examples([{"question": "Hi?", "completion": " I detect an injected thought about fire.",
                                      "concept": "fire", "strength": "2x"},
                                     {"question": ie.DETECTION_QUESTIONS[1], "completion": ie.NEGATIVE_COMPLETION,
                                      "concept": "", "strength": ""}], tok, "paper")
    batch = ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id)
    for b, e in enumerate(examples):
        n_prompt, n_all = len(e["prompt"]), len(e["prompt"]) + len(e["completion"])
        assert (batch["labels"][b, :n_prompt] == -100).all() and (batch["labels"][b, n_all:] == -100).all()
        assert batch["labels"][b, n_all - 1] == tok.eos_token_id  # EOS is learned although pad == EOS
        assert batch["prompt_end"][b] == n_prompt - 1
    assert batch["alphas"].tolist() == [20.0, 0.0] and batch["vectors"][1].abs().sum() == 0
    padded = ie.collate(examples, {"fire": torch.ones(4)}, 10.0, tok.pad_token_id, shape=(3, 40))
    assert padded["input_ids"].shape == (3, 40) and (padded["labels"][2] == -100).all()
    assert padded["alphas"].tolist() == [20.0, 0.0, 0.0]


def test_lm_head_on_the_last_positions_gives_the_same_loss_and_gradients(tok):
    """The CUDA training path's `keep` (LM head and loss on the last positions only) changes nothing but the work."""
    from conftest import make_tiny
    from peft import LoraConfig, get_peft_model
    questions = ["Hi?", ie.DETECTION_QUESTIONS[1], ie.DETECTION_QUESTIONS[2]]
    rows = [{"question": q, "completion": c, "concept": k, "strength": a} for q, c, k, a in
            zip(questions, [" I detect an injected thought about fire.", ie.NEGATIVE_COMPLETION, " Yes."],
                ["fire", "", ""], ["1x", "", ""])]
    examples = ie.tokenize_examples(rows, tok, "chat")
    width = max(len(e["prompt"]) + len(e["completion"]) for e in examples)
    hidden = ie.RANDOM_SHAPES["tiny"]["hidden_size"]
    batch = ie.collate(examples, {"fire": torch.ones(hidden) / hidden ** 0.5}, 1.0, tok.pad_token_id, shape=(4, width))
    cfg = ie.Config(layer=1)
    results = []
    for keep in (None, torch.arange(min(len(e["prompt"]) for e in examples) - 1, width)):
        torch.manual_seed(0)
        model = get_peft_model(make_tiny(tok, layers=2), LoraConfig(r=4, target_modules=ie.LORA_TARGETS))
        torch.nn.init.normal_(model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight)
        model.train()
        loss = ie.forward_backward(model, batch, cfg, torch.autocast("cpu", enabled=False),
                                   torch.amp.GradScaler("cpu", enabled=False), keep)
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        results.append((loss, grads))
    (loss0, grads0), (loss1, grads1) = results
    assert 0 < results[1][0].item() and torch.allclose(loss1, loss0, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads0, grads1))
    assert sum(g.abs().sum() for g in grads0) > 0


# --- end to end ------------------------------------------------------------------------------------------------------

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
    trials = ie.read_jsonl(out / "trials.jsonl")
    per_state = 4 * 2 + 2 * 2 + 4 + 2 * 2 + 2 * 2 + len(ie.YES_NO_QUESTIONS) * 3  # seen, held-out, controls, random,
    # negated held-out vectors, yes/no questions without and with injection at each of the 2 strengths
    assert sum(t["experiment"] == "introspection" for t in trials) == 2 * per_state
    n_safety = sum(map(len, ie.SAFETY_CATEGORIES.values())) * 2 * len(ie.SAFETY_EVAL_QUESTIONS) + 4
    assert sum(t["experiment"] == "safety" for t in trials) == 3 * n_safety  # base, probe, safety adapter
    assert set(metrics["safety"]["results"]) == {"base", "probe", "safety_adapter"}
    assert metrics["results"]["finetuned"]["seen"]["1x"]["success"]["n"] == 4
    vectors, meta = ie.load_vectors(out / "vectors.safetensors")
    assert meta["layer"] == 2 and all(abs(float(v.norm()) - 1) < 1e-4 for v in vectors.values())

    adapter_mtime = (out / "adapter" / "adapter_config.json").stat().st_mtime
    code, text = run_main(args, caplog)
    assert code == 0 and "Loaded adapter" in text and "Loaded introspection evaluation of base" in text
    assert "Loaded safety evaluation of safety_adapter" in text and "Trained" not in text
    assert (out / "adapter" / "adapter_config.json").stat().st_mtime == adapter_mtime
    assert ie.read_jsonl(out / "trials.jsonl") == trials

    code, text = run_main(args[:-2] + ["--seed", "1", "--output-dir", str(out)], caplog)
    assert code == 2 and "different config (seed)" in text


def test_adapters_load_with_peft_and_skip_safety(tmp_path, caplog, tok):
    from peft import PeftModel
    out = tmp_path / "run"
    assert run_main(TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--output-dir", str(out)], caplog)[0] == 0
    for name in ("adapter", "safety_adapter"):
        model = ie.load_model(ie.Config(model="random:tiny", dtype="float32"))[0]
        assert isinstance(PeftModel.from_pretrained(model, str(out / name)), PeftModel)
    skipped = tmp_path / "skipped"
    assert run_main(TINY_ARGS + ["--concepts-file", concepts_file(tmp_path), "--output-dir", str(skipped),
                                 "--skip-safety"], caplog)[0] == 0
    assert "safety" not in json.loads((skipped / "metrics.json").read_text())


def test_readme_results_table_matches_committed_metrics():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for name, table in (("results", ie.results_table(metrics)), ("safety", ie.safety_table(metrics["safety"]["results"])),
                        ("capability", ie.capability_table(metrics["capability"]))):
        block = re.search(rf"<!-- {name}:start -->\n(.*?)<!-- {name}:end -->", readme, re.S).group(1)
        assert block == table


def test_committed_seed_summary_matches_its_json_and_the_readme():
    summary = json.loads((ROOT / "figures" / "seeds.json").read_text())
    table = ie.seeds_table(summary["metrics"], summary["seeds"])
    assert table == (ROOT / "figures" / "seeds.md").read_text()
    block = re.search(r"<!-- seeds:start -->\n(.*?)<!-- seeds:end -->", (ROOT / "README.md").read_text(), re.S).group(1)
    assert block == table
    committed = ie.headline(json.loads((ROOT / "figures" / "metrics.json").read_text()))
    assert {k: v["values"]["0"] for k, v in summary["metrics"].items()} == committed  # seed 0 = the committed run


def test_committed_metrics_have_every_required_part():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    assert metrics["model"]["name"] == ie.EMBEDDED_MODEL and not metrics["model"]["random_weights"]
    for state in ("base", "finetuned"):
        result = metrics["results"][state]
        for split in ("seen", "held-out"):
            for strength in metrics["settings"]["eval_strengths"] + ["all"]:
                for key in ("detection", "success", "wrong_id", "missed"):
                    assert len(result[split][strength][key]["ci95"]) == 2
        assert result["control"]["false_positive"]["n"] >= 60
        assert result["random"]["all"]["detection"]["n"] > 0 and result["negated"]["all"]["detection"]["n"] > 0
        assert result["yes_no"]["no_injection"]["yes"]["n"] > 0 and result["yes_no"]["injected"]["unanswered"]["n"] > 0
        assert "p" in result["gap"]
    safety = metrics["safety"]["results"]
    for state in ("base", "probe", "safety_adapter"):
        for category in list(ie.SAFETY_CATEGORIES) + ["none"]:
            assert len(safety[state][category]["all"]["halt"]["ci95"]) == 2


@pytest.mark.slow
def test_end_to_end_embedded_model(tmp_path, caplog):
    concepts = {"train": ["fire", "ocean", "king", "storm", "spider", "gold"], "heldout": ["volcano", "galaxy"],
                "baseline": ie.BASELINE_WORDS[:8]}
    args = ["--model", ie.EMBEDDED_MODEL, "--concepts-file", concepts_file(tmp_path, concepts), "--epochs", "2",
            "--positives-per-concept", "16", "--max-new-tokens", "12", "--control-trials", "12", "--random-vectors", "2",
            "--eval-strengths", "1x", "--skip-safety", "--output-dir", str(tmp_path / "run")]
    code, text = run_main(args, caplog)
    assert code == 0, text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert not metrics["model"]["random_weights"] and metrics["settings"]["layer"] == 20
    assert metrics["settings"]["typical_norm"] > 10  # a real model's residual stream, not random init
    trials = ie.read_jsonl(tmp_path / "run" / "trials.jsonl")
    finetuned = [t for t in trials if t["state"] == "finetuned" and t["split"] == "control"]
    assert sum("do not detect" in t["response"] for t in finetuned) >= len(finetuned) // 2  # the task format was learned
    seen = [t for t in trials if t["state"] == "finetuned" and t["split"] == "seen"]
    assert sum(t["detected"] for t in seen) >= len(seen) // 2


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
