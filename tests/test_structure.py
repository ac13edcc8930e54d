"""The package's shape, checked: no import cycle, no long module without a reason, light modules stay light,
no command-line option declared twice.

The import graph is read with `ast` (nothing is imported): an edge A -> B for every `import B` or
`from B import ...` that runs when A is imported, i.e. at module level; imports inside functions are
deferred on purpose and do not count.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "culturalign"
MAX_LINES = 400
REASON = "Long because:"
# Modules being changed on another branch (token streaming, issue 15 part 5) whose docstrings this branch leaves
# alone: their reason is kept here until that branch moves it into the docstring.
REASON_ELSEWHERE: dict[str, str] = {}  # module -> reason, for a module whose docstring cannot say it


def module_name(path: Path) -> str:
    parts = ("culturalign",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _module_level(body):
    """The statements that run at import: the module body, descending into if/try/with but not def/class bodies."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list):
                yield from _module_level(inner)


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The culturalign modules `name` imports at module level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _module_level(ast.parse(path.read_text("utf-8")).body):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}  # `from pkg import submodule`
    return {m for m in found if m in known}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None when it is acyclic."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in graph}
    stack: list[str] = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m, WHITE) == GREY:
                return stack[stack.index(m):] + [m]
            if color.get(m, WHITE) == WHITE:
                color.setdefault(m, WHITE)
                found = visit(m)
                if found:
                    return found
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(graph):
        if color[n] == WHITE:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"y"}, "y": set(), "a": {"b", "x"}, "b": {"a"}}) == ["a", "b", "a"]


def test_the_import_reader_sees_module_level_imports_only(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import culturalign.a\nfrom culturalign.b import x\nfrom . import c\ntry:\n    import culturalign.d\n"
                 "except ImportError:\n    pass\n\ndef f():\n    import culturalign.e\n")
    known = {"culturalign.a", "culturalign.b", "culturalign.c", "culturalign.d", "culturalign.e"}
    assert imports_of("culturalign.m", f, known) == {"culturalign.a", "culturalign.b", "culturalign.c", "culturalign.d"}


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "culturalign.alignment.config" in graph["culturalign.alignment.run"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_pipeline_packages_exist_and_say_their_stage():
    for package in ("measure", "backends", "softprompt", "search", "alignment", "heldout", "experiments", "committee",
                    "serve", "data"):
        init = SRC / package / "__init__.py"
        assert init.is_file(), package
        assert ast.get_docstring(ast.parse(init.read_text("utf-8"))), f"{package}/__init__.py has no docstring"


def test_no_long_module_without_a_reason():
    long = []
    for name, path in modules().items():
        text = path.read_text("utf-8")
        if text.count("\n") <= MAX_LINES:
            continue
        rel = str(path.relative_to(SRC))
        doc = ast.get_docstring(ast.parse(text)) or ""
        if REASON not in doc and rel not in REASON_ELSEWHERE:
            long.append(f"{rel} ({text.count(chr(10))} lines)")
    assert long == [], f"over {MAX_LINES} lines without '{REASON} ...' in the docstring: {long}"
    assert all((SRC / rel).is_file() for rel in REASON_ELSEWHERE)


def test_the_config_and_the_registry_import_without_torch():
    """The CLI reads AlignConfig and the optimizer table at start-up, before any model is loaded."""
    code = ("import sys, culturalign.alignment.config, culturalign.search.registry, culturalign.softprompt; "
            "bad = [m for m in ('torch', 'scipy', 'cma', 'culturalign.search.de', 'culturalign.search.sgn') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SRC.parents[1])


@pytest.mark.parametrize("old", ["instrument", "targets", "prompts", "survey", "config", "objective", "alignment",
                                 "reports"])
def test_no_module_left_at_its_old_path(old):
    assert not (SRC / f"{old}.py").exists()


def declared_options(source: str) -> Counter:
    """How many times `source` declares each command-line option: one count per long flag ("--model") in a
    `typer.Option(...)` call, and per metavar of a `typer.Argument(...)` call (as "argument METAVAR")."""
    found: Counter = Counter()
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kind = f.attr if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "typer" else None
        if kind == "Option":
            found.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                         and a.value.startswith("--"))
        elif kind == "Argument":
            found.update(f"argument {k.value.value}" for k in node.keywords
                         if k.arg == "metavar" and isinstance(k.value, ast.Constant))
    return found


def test_the_option_counter_counts_declarations():
    source = (
        "import typer\n"
        "from typing import Annotated\n"
        "def a(x: int = typer.Option(1, '--x', '-x', help='x'), n: str = typer.Argument(..., metavar='N')): ...\n"
        "Y = Annotated[int, typer.Option('--y', metavar='--not-a-flag')]\n"
        "def y(help):\n    return typer.Option('--y', help=help)\n"
        "def b(d: str = typer.Option('--default-value-not-a-flag', '--z')): ...\n"
        "other.Option('--x')\n"
    )
    assert declared_options(source) == {"--x": 1, "--y": 2, "--default-value-not-a-flag": 1, "--z": 1, "argument N": 1}


def test_no_option_declared_twice_in_the_cli():
    """An option several commands take is declared once, in cli/options.py; the commands give it their help."""
    counts = Counter()
    for path in sorted((SRC / "cli").glob("*.py")):
        counts += declared_options(path.read_text("utf-8"))
    assert {"--model", "--device", "--json", "--seed", "--budget", "argument QUESTION"} <= set(counts)
    assert {flag: n for flag, n in counts.items() if n > 1} == {}


def test_the_cli_imports_without_torch():
    """`culturalign --help` loads no model library: each command imports what it needs when it runs."""
    code = ("import sys, culturalign.cli as cli, contextlib, io\n"
            "heavy = ('torch', 'transformers', 'scipy', 'sentence_transformers', 'fastapi', 'culturalign.backends')\n"
            "bad = [m for m in heavy if m in sys.modules]; assert not bad, ('import', bad)\n"
            "for argv in (['--help'], ['survey', '--help'], ['align', '--help'], ['serve', '--help']):\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        assert cli.run(argv) == 0\n"
            "bad = [m for m in heavy if m in sys.modules]; assert not bad, ('--help', bad)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=SRC.parents[1])
