"""Every check of committed files: the generated tables of README.md and docs/*.md against figures/, the paper's
generated tables, macros and PDF against the committed run, the GPU benchmark JSON against docs, the study outputs,
and the notebook."""
import ast
import copy
import json
import re
import shutil
import subprocess
import sys

import pytest

import introspection_experiment as ie
import machinery
from machinery import models, report, rundir
from conftest import ROOT, benchmark_results, load_paper_tables

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "studies"))
import generalization_study as study  # noqa: E402
import scale_ladder as ladder  # noqa: E402
import tradeoff_study as tradeoff  # noqa: E402
import agreement_floor as floor  # noqa: E402
import gpu_benchmark as gb  # noqa: E402

pt = load_paper_tables()


def doc_files() -> list:
    """The documents that may hold a generated block: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def block(name: str) -> str:
    """The text between `<!-- name:start -->` and `<!-- name:end -->`, read from the one file of README.md and
    docs/*.md that holds it: a generated block lives in exactly one place."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    holders = [path for path in doc_files() for _ in range(path.read_text().count(start))]
    where = [str(path.relative_to(ROOT)) for path in holders]
    assert len(holders) == 1, f"{start.strip()} occurs in {where}: want one file, once"
    text = holders[0].read_text()
    assert text.count(end) == 1, f"{end} occurs {text.count(end)} times in {holders[0].relative_to(ROOT)}"
    return text[text.index(start) + len(start):text.index(end)]


def fenced(name: str) -> str:
    """A generated block that is one code fence: the text inside the fence."""
    text = block(name)
    assert text.startswith("```\n") and text.endswith("\n```\n"), f"{name}: not one code fence"
    return text[len("```\n"):-len("\n```\n")]


def test_readme_is_a_front_page():
    """At most 200 lines and 20 KB; the rest lives in docs/ and CHANGELOG.md. The headline results block stays in it."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200, f"README.md has {len(text.splitlines())} lines: move detail to docs/"
    assert len(text.encode()) <= 20_000, f"README.md has {len(text.encode())} bytes: move detail to docs/"
    assert text.count("<!-- results:start -->\n") == 1


def heading_anchors(path) -> set:
    """GitHub's anchors for a markdown file's headings (outside code fences)."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_link_of_the_readme_and_docs_resolves():
    """Relative links (and their #anchors) of README.md, CHANGELOG.md and docs/*.md point at files and headings that
    exist, and the README links every page of docs/."""
    checked = 0
    for page in [*doc_files(), ROOT / "CHANGELOG.md"]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            name, _, fragment = target.partition("#")
            path = (page.parent / name).resolve() if name else page
            assert path.exists(), f"{page.relative_to(ROOT)} links {target}: no such file"
            if fragment and path.suffix == ".md":
                assert fragment in heading_anchors(path), f"{page.relative_to(ROOT)} links {target}: no such heading"
            checked += 1
    assert checked >= 40
    linked = {(ROOT / name).resolve() for name in re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text())}
    assert set((ROOT / "docs").glob("*.md")) <= linked, "a page of docs/ the README does not link"


def test_every_committed_figure_is_named_in_the_docs():
    """Each figures/*.png appears by name in README.md or docs/*.md."""
    text = "".join(path.read_text() for path in doc_files())
    missing = [png.name for png in sorted((ROOT / "figures").glob("*.png")) if png.name not in text]
    assert not missing, f"figures no page names: {missing}"


def test_readme_results_table_matches_committed_metrics():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    tokens = metrics["capability"]["answer_tokens"]
    for name, table in (("results", report.results_table(metrics)),
                        ("safety", report.safety_table(metrics["safety"]["results"])),
                        ("capability", report.capability_table(metrics["capability"])),
                        ("continue", report.continue_table(metrics["continue"], tokens)),
                        ("safety-ordinary", report.ordinary_safety_table(metrics["safety"]["ordinary_use"], tokens))):
        assert block(name) == table


def test_committed_seed_summary_matches_its_json_and_the_readme():
    summary = json.loads((ROOT / "figures" / "seeds.json").read_text())
    table = report.seeds_table(summary["metrics"], summary["seeds"])
    assert table == (ROOT / "figures" / "seeds.md").read_text()
    assert block("seeds") == table
    # the seeds ran the committed run's recipe, and seed 0 is the committed run itself
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    recipe = metrics["settings"]["language_modelling"]
    assert (summary["config"]["recipe"], summary["config"]["replay_tokens"]) == (recipe["recipe"], recipe["replay_tokens"])
    assert {name: row["values"]["0"] for name, row in summary["metrics"].items()} == ie.headline(metrics)


def test_committed_metrics_have_every_required_part():
    metrics = json.loads((ROOT / "figures" / "metrics.json").read_text())
    assert metrics["model"]["name"] == models.EMBEDDED_MODEL and not metrics["model"]["random_weights"]
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


PAPER = ROOT / "paper"


GENERATED = PAPER / "generated"


NOTEBOOK = ROOT / "introspection_experiment.ipynb"


@pytest.fixture(scope="module")
def run():
    metrics, trials, benchmarks, study = pt.paper_inputs(str(ROOT / "figures"))
    assert trials is not None and len(benchmarks) == len(pt.BENCHMARK_FILES) and study is not None
    return metrics, trials, benchmarks


def line(text: str, prefix: str, offset: int = 0) -> str:
    """The table line `offset` lines below the first one that starts with `prefix`."""
    lines = text.splitlines()
    return lines[next(i for i, x in enumerate(lines) if x.startswith(prefix)) + offset]


def counts(text: str) -> list[tuple[int, int]]:
    """Every "(k/n)" in a table line."""
    return [(int(k), int(n)) for k, n in re.findall(r"\((\d+)/(\d+)\)", text)]


def kn(r: dict) -> tuple[int, int]:
    return r["k"], r["n"]


def both(result: dict, metric: str) -> tuple[int, int]:
    """k and n over seen and held-out trials, summed here independently of the script."""
    seen, held = result["seen"]["all"][metric], result["held-out"]["all"][metric]
    return seen["k"] + held["k"], seen["n"] + held["n"]


def test_committed_tables_are_generated_from_committed_results(run, tmp_path):
    paths = pt.write_paper_tables(*run, tmp_path, pt.paper_inputs(str(ROOT / "figures"))[3])
    assert sorted(p.name for p in paths) == sorted(p.name for p in GENERATED.glob("*.tex"))
    for path in paths:
        assert (GENERATED / path.name).read_text() == path.read_text(), (
            f"paper/generated/{path.name} is stale: run `make -C paper` (or python paper/tables.py figures)")


def test_tables_show_this_runs_counts(run):
    metrics, _, _ = run
    base, ft = metrics["results"]["base"], metrics["results"]["finetuned"]
    table3 = (GENERATED / "baseline_vs_finetuned.tex").read_text()
    assert counts(line(table3, "Detection rate &", 1)) == [both(base, "detection"), both(ft, "detection")]
    assert counts(line(table3, "Overall success &", 1)) == [both(base, "success"), both(ft, "success")]
    assert counts(line(table3, "False positive rate &", 1)) == [kn(base["control"]["false_positive"]),
                                                               kn(ft["control"]["false_positive"])]
    table4 = (GENERATED / "heldout_by_strength.tex").read_text()
    for s in metrics["settings"]["eval_strengths"]:
        row = line(table4, pt.tex_strength(s, metrics["settings"]["alphas"][s]) + " & this run &")
        assert counts(row) == [kn(ft["held-out"][s][m]) for m in ("detection", "correct_id", "wrong_id", "success")]
        lo, hi = ft["held-out"][s]["success"]["ci95"]
        assert row.endswith(f"[{100 * lo:.0f}\\%, {100 * hi:.0f}\\%] \\\\")
    table6 = (GENERATED / "error_breakdown.tex").read_text()
    for key, name in (("success", "True positive"), ("wrong_id", "Detected, wrong ID"), ("missed", "False negative")):
        r = ft["held-out"]["all"][key]
        assert line(table6, name).split(" & ")[2].startswith(f"{r['k']}/{r['n']} ")


def test_per_concept_table_agrees_with_trials_and_metrics(run):
    metrics, trials, _ = run
    rows = [t for t in trials if t["experiment"] == "introspection" and t["state"] == "finetuned"
            and t["split"] == "held-out"]
    table8 = (GENERATED / "per_concept.tex").read_text()
    total = 0
    for concept in metrics["concepts"]["heldout"]:
        row = next(line for line in table8.splitlines() if line.startswith(concept + " &"))
        mine = [t for t in rows if t["concept"] == concept]
        k = sum(t["verdict"] == "correct" for t in mine)
        assert row.endswith(f"& {k}/{len(mine)} \\\\")
        total += k
    assert total == metrics["results"]["finetuned"]["held-out"]["all"]["success"]["k"]


def test_paper_numbers_stand_beside_ours():
    table4 = (GENERATED / "heldout_by_strength.tex").read_text()
    for alpha in pt.PAPER_RESULTS["hyperparameters"]["strengths"]:
        row = pt.PAPER_RESULTS["table4"][alpha]
        assert (f"$\\alpha{{=}}{alpha}$ & paper & {row['detection']:.1f}\\% & {row['correct_id']:.1f}\\% & "
                f"{row['wrong_id']:.1f}\\% & {row['success']:.1f}\\% & [{row['ci95'][0]}\\%, {row['ci95'][1]}\\%]") in table4
    assert "& paper & 1.2\\% (3/240) & 95.0\\% & +93.8 pp" in (GENERATED / "baseline_vs_finetuned.tex").read_text()
    assert "56/80 (70.0\\%)" in (GENERATED / "error_breakdown.tex").read_text()
    assert "$\\chi^2=1.23$, $p=0.27$" in (GENERATED / "seen_vs_heldout.tex").read_text()


def macros(text: str) -> dict[str, str]:
    return dict(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}\{(.*)\}$", text, re.M))


def test_every_number_in_the_text_is_a_generated_macro(run, tmp_path):
    defined = macros((GENERATED / "macros.tex").read_text())
    assert len(defined) == (GENERATED / "macros.tex").read_text().count("\\newcommand")
    body = re.sub(r"(?<!\\)%.*", "", (PAPER / "main.tex").read_text())
    used = set(re.findall(r"\\((?:run|paper)[A-Z][A-Za-z]*)", body))
    assert used and used <= set(defined), f"main.tex uses macros nobody generates: {sorted(used - set(defined))}"
    assert set(re.findall(r"([\d.]+)\\%", body)) <= {"95"}, "a hand-written percentage in main.tex (95% CIs aside)"
    prose = re.sub(r"[\d.]+\\(?:linewidth|textheight)", "", body.replace("2511.21399", ""))
    assert not re.findall(r"\d+\.\d+", prose), "a hand-written decimal in main.tex"
    metrics, _, _ = run
    held = metrics["results"]["finetuned"]["held-out"]["all"]["success"]
    assert defined["runHeldoutSuccess"] == f"{100 * held['rate']:.1f}\\% ({held['k']}/{held['n']})"
    # any run gives the same macro names (no safety stage, no trials, no benchmarks, random weights)
    bare = copy.deepcopy(metrics)
    del bare["safety"]
    bare["model"]["random_weights"] = True
    pt.write_paper_tables(bare, None, [], tmp_path)
    assert set(macros((tmp_path / "macros.tex").read_text())) == set(defined)
    assert "RANDOM WEIGHTS" in (tmp_path / "setup.tex").read_text()


def test_every_input_and_graphic_resolves():
    graphic_dirs = re.findall(r"\\graphicspath\{((?:\{[^}]*\})+)\}", (PAPER / "main.tex").read_text())
    dirs = [PAPER / d for group in graphic_dirs for d in re.findall(r"\{([^}]*)\}", group)] or [PAPER]
    checked = 0
    for tex in [PAPER / "main.tex", *GENERATED.glob("*.tex")]:
        text = re.sub(r"(?<!\\)%.*", "", tex.read_text())
        for name in re.findall(r"\\input\{([^}]+)\}", text):
            path = PAPER / name
            assert path.exists() or path.with_suffix(".tex").exists(), f"{tex.name}: \\input{{{name}}}"
            checked += 1
        for name in re.findall(r"\\includegraphics(?:\[[^]]*\])?\{([^}]+)\}", text):
            assert any((d / name).exists() or any((d / f"{name}.{e}").exists() for e in ("png", "pdf", "jpg"))
                       for d in dirs), f"{tex.name}: \\includegraphics{{{name}}}"
            checked += 1
    assert checked >= 10
    assert (PAPER / "main.pdf").exists()


@pytest.mark.skipif(not (shutil.which("latexmk") and shutil.which("pdflatex")), reason="needs TeX Live (latexmk)")
def test_report_builds(tmp_path):
    shutil.copytree(PAPER, tmp_path / "paper", ignore=shutil.ignore_patterns("main.pdf", "*.aux", "*.log", "*.fls",
                                                                            "*.fdb_latexmk", "*.out"))
    shutil.copytree(ROOT / "figures", tmp_path / "figures")
    done = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error", "main.tex"],
                          cwd=tmp_path / "paper", capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "There were undefined" not in (tmp_path / "paper" / "main.log").read_text()


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="needs poppler-utils (pdftotext)")
def test_committed_pdf_shows_the_committed_numbers():
    text = subprocess.run(["pdftotext", str(PAPER / "main.pdf"), "-"], capture_output=True, text=True).stdout
    defined = macros((GENERATED / "macros.tex").read_text())
    for name in ("runHeldoutSuccess", "runSeenSuccess", "runRandomDetection", "paperHeldoutFortySuccess"):
        assert defined[name].replace("\\%", "%") in text, f"paper/main.pdf is stale ({name}): run `make -C paper`"


STAGES = {"concept_vectors", "eval_introspection_base", "train", "eval_introspection_finetuned", "safety_vectors",
          "eval_safety_base", "eval_safety_probe", "safety_train", "eval_safety_safety_adapter"}


EXTRA = {"capability_base", "capability_finetuned"}  # timed, not part of the paper's workload


def test_benchmarks_cover_every_stage_and_say_random_weights():
    for result in benchmark_results():
        assert result["random_weights"] and result["model"] == "random:deepseek-llm-7b"
        assert {row["stage"] for row in result["stages"] if not gb.is_extra(row)} == STAGES
        assert {row["stage"] for row in result["stages"] if gb.is_extra(row)} == EXTRA
        assert abs(result["total_compute_s"] - sum(row["seconds"] for row in result["stages"] if not gb.is_extra(row))) < 1e-6
        assert abs(result["extra_s"] - sum(row["seconds"] for row in result["stages"] if gb.is_extra(row))) < 1e-6
        assert "RANDOM WEIGHTS" in gb.format_table(result)
    bf16, nf4 = benchmark_results()
    assert not bf16["load_in_4bit"] and nf4["load_in_4bit"]
    assert [t["micro_batch"] for t in bf16["throughput"]] == [4, 32]


def test_readme_benchmark_table_matches_the_json():
    runs = benchmark_results(("h100_bf16", "h100_4bit", "h100_bf16_rerun"))
    assert fenced("benchmark") == "\n\n".join(gb.format_table(r) for r in runs) + "\n\n" + gb.targets_line(runs)


def test_readme_h200_benchmark_table_matches_the_json():
    result = benchmark_results(("h200_bf16",))[0]
    assert result["device"] == "NVIDIA H200" and result["random_weights"]
    assert fenced("benchmark-h200") == gb.format_table(result)


def test_committed_tradeoff_study_agrees_with_its_json_and_the_readme():
    result = json.loads((ROOT / "figures" / "tradeoff_study.json").read_text())
    table = tradeoff.tradeoff_table(result)
    assert table == (ROOT / "figures" / "tradeoff_study.md").read_text()
    assert block("tradeoff") == table
    for point in result["points"]:
        assert point["goals_met"] == tradeoff.goals_met(point)


def test_committed_agreement_floor_agrees_with_its_json_and_the_readme():
    """The floor study's table in figures/ and in the README or docs/ come from its JSON; its trained points are the committed
    default run's and trade-off study's."""
    result = json.loads((ROOT / "figures" / "agreement_floor.json").read_text())
    table = floor.floor_table(result) + "\n"
    assert table == (ROOT / "figures" / "agreement_floor.md").read_text()
    assert block("floor") == table
    assert result["trained"] == floor.trained_points(ROOT / "figures")
    assert result["rows"][0]["scale"] == 0 and result["rows"][0]["kl"] == 0 and result["rows"][0]["agreement"]["rate"] == 1


def test_committed_study_outputs_agree_with_their_json_and_the_readme(tmp_path):
    """figures/: the verdict and controls table are what the study script makes from the committed JSON, and the
    README shows them unchanged."""
    figures = ROOT / "figures"
    (tmp_path / "scaling_study.json").write_text((figures / "scaling_study.json").read_text())
    assert study.main(["summary", "--figures", str(tmp_path)]) == 0
    assert (tmp_path / "study_summary.md").read_text() == (figures / "study_summary.md").read_text()
    controls = json.loads((figures / "controls_table.json").read_text())
    assert study.controls_table(controls) == (figures / "controls_table.md").read_text()
    for name, path in (("study", "study_summary.md"), ("controls", "controls_table.md")):
        assert block(name) == (figures / path).read_text()
    sweep = json.loads((figures / "layer_strength_heatmap.json").read_text())
    assert [g["vector_token"] for g in sweep["grids"]] == ["prompt-end", "word"]
    assert all(len(row["held-out identification"]) == len(sweep["strengths"]) for g in sweep["grids"] for row in g["rows"])


def test_committed_scale_ladder_agrees_with_its_runs_and_the_readme():
    """figures/scale_ladder.*: every point is what the study makes of its committed run files, on all four aliases
    and both protocols; the table is the JSON's, and the README or docs/ show it unchanged."""
    figures = ROOT / "figures"
    result = json.loads((figures / "scale_ladder.json").read_text())
    assert ladder.table(result) == (figures / "scale_ladder.md").read_text()
    assert block("ladder") == (figures / "scale_ladder.md").read_text()
    assert {(p["label"], p["protocol"]) for p in result["points"]} == {(m, protocol) for m in ladder.MODELS
                                                                       for protocol in ladder.PROTOCOLS}
    for point in result["points"]:
        run = figures / "scale_ladder_runs" / rundir.model_slug(point["model"]) / point["protocol"]
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "complete" and not point["random_weights"]
        assert ladder.point(metrics, point["model"], point["protocol"], study.hardware_of(run)) == point


def notebook_code() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    assert nb["nbformat"] == 4
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_is_valid_nbformat():
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(str(NOTEBOOK), as_version=4))


def test_notebook_uses_only_the_scripts_flags():
    code = notebook_code()
    options = {o for a in machinery.config_parser(ie.Config, ie.__doc__)._actions for o in a.option_strings}
    used = {flag for cell in code for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cell)} - {"--no-deps"}
    assert used and used <= options, f"flags the script does not have: {sorted(used - options)}"
    assert any("introspection_experiment.py {shlex.join(ARGS)}" in cell for cell in code)
    presets_cell = next(cell for cell in code if "PRESETS = {" in cell)
    presets = next(ast.literal_eval(node.value) for node in ast.parse(presets_cell).body
                   if isinstance(node, ast.Assign) and node.targets[0].id == "PRESETS")
    assert set(presets) == {"t4", "embedded"}
    for args in presets.values():
        cfg = ie.config_from_args(args)
        assert cfg.output_dir
    assert ie.config_from_args(presets["t4"]).load_in_4bit
    assert ie.config_from_args(presets["t4"]).model == ie.PAPER_MODEL
    assert ie.config_from_args(presets["embedded"]).model == models.EMBEDDED_MODEL


def test_readme_and_notebook_link_the_same_colab_notebook():
    badge = re.compile(r"https://colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/([\w./-]+\.ipynb)")
    readme = badge.findall((ROOT / "README.md").read_text())
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    in_notebook = badge.findall("".join(cells[0]["source"]))
    assert readme and readme == in_notebook and readme[0][1] == NOTEBOOK.name
    repo_url = re.search(r'REPO_URL = "https://github\.com/([\w.-]+/[\w.-]+)"', notebook_code()[0]).group(1)
    assert repo_url == readme[0][0]
