"""The house stays as built: imports run one way, low to high, and no two files import each other (directly
or round a longer loop), counting the imports inside functions too. Read from the source, not by importing it,
so a lazy import cannot hide. Imports under `if TYPE_CHECKING:` are annotations and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "glassmind"

# low to high; a package may import its own layer and those below it
LAYERS = {"common": 0, "__init__": 0, "tokenizer": 1, "data": 1, "model": 2, "train": 3, "infer": 3,
          "parallel": 4, "autopsy": 4, "recipes": 5, "serve": 6, "evals": 6, "studies": 7, "demo": 8,
          "__main__": 9}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module) for every glassmind module `path` imports, at any depth of the file."""
    return imports_in(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py", known)


def imports_in(text: str, me: str, is_package: bool, known: dict[str, Path]) -> list[tuple[int, str]]:
    tree = ast.parse(text)
    skip = _type_checking_nodes(tree)
    package = me if is_package else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("glassmind")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from its package
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("glassmind"):
                continue
            for a in node.names:  # `from glassmind.model import heads` imports the module heads
                sub = f"{base}.{a.name}"
                out.append((node.lineno, sub if sub in known else base))
    return [(line, m) for line, m in out if m in known and m != me]


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_file_belongs_to_a_layer():
    unknown = sorted({m.split(".")[1] for m in modules() if "." in m and m.split(".")[1] not in LAYERS})
    assert not unknown, f"add these packages to the layer order (tests/test_house.py, README layout): {unknown}"


def test_no_module_imports_a_layer_above_its_own():
    known = modules()
    upward = [f"{path.relative_to(ROOT.parent)}:{line} imports {m}"
              for name, path in known.items() for line, m in imports_of(path, known) if layer(m) > layer(name)]
    assert not upward, "imports that run up the house:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph (a list of nodes, first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles_between_files():
    known = modules()
    graph = {name: {m for _, m in imports_of(path, known)} for name, path in known.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, cyclic", [({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
                                           ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
                                           ({"a": {"a"}}, True)])
def test_the_cycle_finder_finds_cycles(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic


def test_the_import_reader_sees_imports_inside_functions():
    """A lazy import is still an import: the reader must see it, and skip the TYPE_CHECKING ones."""
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from glassmind.studies import alignment\n"
            "def f():\n    from glassmind.recipes import sft\n")
    seen = [m for _, m in imports_in(text, "glassmind.train.run", False, modules())]
    assert seen == ["glassmind.recipes.sft"]
    assert layer(seen[0]) > layer("glassmind.train.run")  # what test_no_module_imports... would refuse
