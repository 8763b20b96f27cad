"""The layout the project promises: the script is the experiment in run order, the machinery beside it never imports
it, and the studies, the benchmark and the paper tables use only the declared surfaces (`__all__`)."""
import ast
import importlib
import re

import pytest

import introspection_experiment as ie
from conftest import ROOT

SCRIPT = ROOT / "introspection_experiment.py"
MACHINERY = sorted((ROOT / "machinery").glob("*.py"))
USERS = [*sorted((ROOT / "studies").glob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py")),
         ROOT / "paper" / "tables.py", ROOT / "chat.py"]
MODULES = {"ie": "introspection_experiment", "machinery": "machinery", "rundir": "machinery.rundir",
           "models": "machinery.models", "fastpath": "machinery.fastpath", "report": "machinery.report"}


def banner_sections(lines: list[str]) -> list[int]:
    """The first line (1-based) of each section of the script: a rule line of dashes, then the section's title."""
    return [i + 1 for i, line in enumerate(lines) if line.startswith("# " + "-" * 100)]


def top_level(tree: ast.Module) -> dict[str, ast.AST]:
    """Each name the module defines at its top level (functions, classes, assignments), with its node."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    out[target.id] = node
    return out


def forward_references(source: str) -> list[str]:
    """'user -> used' for every top-level definition of `source` that uses a name defined in a later section."""
    lines, tree = source.splitlines(), ast.parse(source)
    starts = banner_sections(lines)

    def section(line: int) -> int:
        return sum(start <= line for start in starts)

    defined = top_level(tree)
    found = []
    for name, node in defined.items():
        for sub in ast.walk(node):
            used = defined.get(sub.id) if isinstance(sub, ast.Name) else None
            if used is not None and section(used.lineno) > section(node.lineno):
                found.append(f"{name} -> {sub.id}")
    return sorted(set(found))


def test_no_definition_of_the_script_uses_a_later_section():
    assert forward_references(SCRIPT.read_text()) == []


def test_a_forward_reference_across_sections_is_found():
    rule = "# " + "-" * 118
    source = f"{rule}\n# one\ndef a():\n    return b()\n\n{rule}\n# two\ndef b():\n    return 1\n"
    assert forward_references(source) == ["a -> b"]


def test_the_machinery_never_imports_the_script():
    for path in MACHINERY:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("introspection_experiment") for n in names), path


@pytest.mark.parametrize("path", [SCRIPT, *MACHINERY], ids=lambda p: p.name)
def test_no_function_is_over_80_lines(path):
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80]
    assert long == []


def test_the_script_stays_readable_in_length():
    assert len(SCRIPT.read_text().splitlines()) <= 2400


def used_names(path) -> set[tuple[str, str]]:
    """(module, name) for every `alias.name` and `from module import name` in `path` whose module is the script or
    the machinery."""
    text = path.read_text()
    found = {(MODULES[alias], name)
             for alias, name in re.findall(r"\b(ie|machinery|rundir|models|fastpath|report)\.([A-Za-z_]\w*)", text)}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                "introspection_experiment", "machinery"):
            found |= {(node.module, a.name) for a in node.names}
    return {(module, name) for module, name in found if name not in MODULES}


@pytest.mark.parametrize("path", USERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_the_studies_benchmark_and_paper_use_only_the_declared_surface(path):
    undeclared = sorted(f"{module}.{name}" for module, name in used_names(path)
                        if name not in importlib.import_module(module).__all__)
    assert undeclared == []


def test_every_declared_name_exists():
    for module in set(MODULES.values()):
        mod = importlib.import_module(module)
        assert [n for n in mod.__all__ if not hasattr(mod, n)] == [], module
    assert "run" in ie.__all__ and "injection" in ie.__all__


def test_the_script_never_imports_its_users():
    """chat.py, the studies, the benchmark and the paper tables use the script; the script uses none of them."""
    imported = {a.name.split(".")[0] for node in ast.walk(ast.parse(SCRIPT.read_text()))
                for a in (node.names if isinstance(node, ast.Import) else [])}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(SCRIPT.read_text()))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {p.stem for p in USERS}
