"""The package's layout is its layering (README's "Layout of the repository"): each module imports
only modules of its own layer or of the layers below, so no import circle can form, and every
public name the README shows is importable where it says.

Reads the installed package's source with ast: every `from . import`, `from .x import`, `import
zeroshard.x`, at module level or inside a function, counts.
"""
import ast
import importlib
import os
import re

import pytest

import zeroshard

PACKAGE_DIR = os.path.dirname(os.path.abspath(zeroshard.__file__))

# Lowest first. A subpackage is a layer; top-level modules are named one by one.
LAYERS = [
    ("core", {"_core", "_tensors", "ops", "env"}),
    ("comm", {"comm"}),
    ("sharded_params", {"sharded_params"}),
    ("sharding", {"sharding"}),
    ("offload", {"offload"}),
    ("memory", {"memory"}),
    ("public", {"optimizers", "zero_optimizer", "gradient_reducer"}),
    ("checkpoint", {"checkpoint"}),
    ("integrations", {"integrations"}),
    # the front door and the old command-line paths re-export from any layer
    ("entry", {"__init__", "estimate", "export"}),
]
LEVEL = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def _modules():
    """{dotted name below zeroshard ('' for the package itself): path}"""
    out = {}
    for d, _, files in os.walk(PACKAGE_DIR):
        if "__pycache__" in d:
            continue
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), PACKAGE_DIR)[:-3].replace(os.sep, ".")
                name = "" if rel == "__init__" else rel[:-len(".__init__")] \
                    if rel.endswith(".__init__") else rel
                out[name] = os.path.join(d, f)
    out["_core"] = None  # the compiled extension
    return out


def _imports(name, path, modules):
    """The zeroshard modules `name` imports."""
    is_package = path.endswith("__init__.py")
    here = name.split(".") if name else []
    base = here if is_package else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - (node.level - 1)] if node.level > 1 else list(base)
                target = ".".join(parts + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "zeroshard":
                target = node.module[len("zeroshard."):] if node.module != "zeroshard" else ""
            else:
                continue
            for alias in node.names:
                child = f"{target}.{alias.name}" if target else alias.name
                found.add(child if child in modules else target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("zeroshard."):
                    found.add(alias.name[len("zeroshard."):])
    return {m for m in found if m in modules and m != name}


def _layer(name):
    top = name.split(".")[0] if name else "__init__"
    return LEVEL[top]


def test_every_module_has_a_layer():
    unplaced = [m for m in _modules() if (m.split(".")[0] if m else "__init__") not in LEVEL]
    assert not unplaced, (f"{unplaced} are in no layer: add them to LAYERS here and to the "
                          "README's layout")


def test_modules_import_only_their_layer_and_those_below():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if path is None:
            continue
        for dep in _imports(name, path, modules):
            if _layer(dep) > _layer(name):
                upward.append(f"{name or 'zeroshard'} ({LAYERS[_layer(name)][0]}) imports "
                              f"{dep or 'zeroshard'} ({LAYERS[_layer(dep)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    modules = _modules()
    graph = {m: _imports(m, p, modules) if p else set() for m, p in modules.items()}
    # The package __init__ files import their children; a child importing a sibling through
    # its package would be a circle, and is one here.
    state, circles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                circles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"
    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    circles = [c for c in circles if "" not in c]  # zeroshard/__init__ re-exports everything
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("statement", [
    "from zeroshard import (ZeroAdamW, ZeroAdam, ZeroSGD, ZeroRedundancy, ZeroOptimizer, "
    "GradientReducer, sharded_init, full_params, ShardedAccessError, ShardedTensor, "
    "ShardedParameter, CollectiveTimeout, CoreError, ops, checkpoint, __version__)",
    "from zeroshard.checkpoint import save, load, CheckpointError",
    "from zeroshard.estimate import estimate_model_states, param_numels_of, main",
    "from zeroshard.export import export, main",
    "from zeroshard.env import nccl_library_path",
    "from zeroshard.ops import adam_step, set_num_threads",
])
def test_public_names_import_where_the_readme_says(statement):
    exec(statement, {})


REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)


def _documented_names():
    names = set()
    docs = [os.path.join(REPO, "README.md")] + [
        os.path.join(REPO, "docs", f) for f in sorted(os.listdir(os.path.join(REPO, "docs")))
        if f.endswith(".md")]
    for path in docs:
        names.update(re.findall(r"\bzeroshard(?:\.[A-Za-z_]\w*)+", open(path).read()))
    return sorted(names)


@pytest.mark.parametrize("dotted", _documented_names())
def test_every_name_the_docs_show_resolves(dotted):
    """`zeroshard.a.b.C` in README.md or docs/: the longest importable prefix, then attributes."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ModuleNotFoundError as e:
            if e.name and not ".".join(parts[:k]).startswith(e.name):
                raise  # a dependency of the module is missing, not the module
            continue
        for attr in parts[k:]:
            assert hasattr(obj, attr), f"{dotted}: {'.'.join(parts[:k])} has no {attr}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{dotted}: nothing of it imports")
