"""The package's import graph follows the order its docstring states (uvit_jax/__init__.py)."""
import ast
import pathlib
import re

import uvit_jax

PACKAGE = pathlib.Path(uvit_jax.__file__).parent


def stated_order() -> list[set[str]]:
    """The groups of `uvit_jax.__doc__`'s "Data flows one way: a -> b / c -> ..." sentence, left to right."""
    sentence = re.search(r"Data flows one way:(.*?)\. A module", uvit_jax.__doc__, re.S).group(1)
    sentence = re.sub(r"\([^)]*\)", "", sentence)
    return [{name.strip() for name in group.split("/")} for group in sentence.split("->")]


def imports_of_package() -> dict[str, set[str]]:
    """Top-level module (or subpackage) of uvit_jax -> the other top-level modules of uvit_jax it imports."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        top = parts[0]
        deps = graph.setdefault(top, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "uvit_jax":
                names = node.module.split(".")[1:2] or [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("uvit_jax.")]
            else:
                continue
            deps.update(n for n in names if n != top)
    return graph


def order_violations(graph: dict[str, set[str]], groups: list[set[str]]) -> list[str]:
    """What breaks the stated order: modules it does not list, imports of a module not strictly to the left."""
    rank = {name: i for i, group in enumerate(groups) for name in group}
    out = [f"{m} is not listed in uvit_jax/__init__.py's order" for m in sorted(set(graph) - set(rank))]
    return out + [f"{m} imports {d}" for m, deps in sorted(graph.items()) if m in rank
                  for d in sorted(deps) if rank[d] >= rank[m]]


def test_every_module_imports_only_modules_to_its_left():
    assert order_violations(imports_of_package(), stated_order()) == []


def test_a_backward_import_or_an_unlisted_module_is_caught():
    graph = imports_of_package()
    graph["parallel"] = graph["parallel"] | {"train"}
    graph["newmodule"] = set()
    assert order_violations(graph, stated_order()) == ["newmodule is not listed in uvit_jax/__init__.py's order",
                                                       "parallel imports train"]
