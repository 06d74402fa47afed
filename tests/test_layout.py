"""Module hygiene the layout relies on: no module reads another module's underscored names (issue 13), the
runtime reaches the merge and quantize steps only through its loading seam, imports point down the layers, and
no modules import each other in a cycle (issue 24). Imports inside functions and under ``TYPE_CHECKING`` count."""

from __future__ import annotations

import ast
from pathlib import Path

import lavin_edge

PKG = Path(lavin_edge.__file__).resolve().parent

# The runtime reads model dirs through lavin_edge.modeldir; it imports no pipeline step (merge, quantize):
# everything chat needs, the lm_head's 4-bit form included, is in the quantized dir.
SEAM_ALLOWED: set[tuple[str, str]] = set()
PIPELINE_STEPS = ("lavin_edge.merge", "lavin_edge.quantize")
# The compiled extension is a private module of the kernels package, imported in one place.
PRIVATE_ALLOWED = {("kernels/dispatch.py", "from lavin_edge import _C")}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(p.relative_to(PKG)), ast.parse(p.read_text(), str(p))) for p in sorted(PKG.rglob("*.py"))]


def _module_name(rel: str) -> str:
    parts = ["lavin_edge", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(rel: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    pkg = _module_name(rel).split(".")
    if not rel.endswith("__init__.py"):
        pkg = pkg[:-1]
    base = pkg[: len(pkg) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    path = PKG.parent / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _private_reads(rel: str, tree: ast.Module, module_aliases: dict[str, str]) -> list[str]:
    """`from other import _x`, and `alias._x` where alias is another lavin_edge module."""
    own = _module_name(rel)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            src = _absolute(rel, node)
            if src.startswith("lavin_edge") and src != own:
                out += [f"from {src} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            target = module_aliases.get(node.value.id)
            if target and target != own and node.attr.startswith("_") and not node.attr.startswith("__"):
                out.append(f"{node.value.id}.{node.attr} ({target})")
    return out


def _aliases(rel: str, tree: ast.Module) -> dict[str, str]:
    """Names bound to lavin_edge modules in this file (import x as y, from pkg import module)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lavin_edge") and a.asname:
                    out[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(rel, node)
            for a in node.names:
                full = f"{src}.{a.name}"
                if src.startswith("lavin_edge") and _is_module(full):
                    out[a.asname or a.name] = full
    return out


def test_no_module_reads_another_modules_private_names() -> None:
    offenders = {}
    for rel, tree in _modules():
        found = [f for f in _private_reads(rel, tree, _aliases(rel, tree)) if (rel, f) not in PRIVATE_ALLOWED]
        if found:
            offenders[rel] = found
    assert not offenders, offenders


def _imports(rel: str, tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(rel, node)
            out.add(src)
            out |= {f"{src}.{a.name}" for a in node.names if _is_module(f"{src}.{a.name}")}
    return out


def test_runtime_reaches_merge_and_quantize_only_through_the_loading_seam() -> None:
    offenders = []
    for rel, tree in _modules():
        if not rel.startswith("runtime/"):
            continue
        for name in sorted(_imports(rel, tree)):
            if name.startswith(PIPELINE_STEPS) and (rel, name) not in SEAM_ALLOWED:
                offenders.append(f"{rel}: {name}")
    assert not offenders, offenders


# The package's layers, lowest first. A module may import its own top-level package and the layers below its own;
# packages side by side in one layer (chat and serve, runtime and training) do not import each other. A new
# top-level module or package goes into this table (the test names any that is missing).
LAYERS: list[set[str]] = [
    {"config", "modality", "decoding", "kernels"},  # shared vocabulary, the decode loop; kernels: the extension
    {"prompt"},  # the sequence layout (chat format, image slots)
    {"model"},  # the PyTorch LaVIN (training's model)
    {"io", "data"},  # checkpoint loaders and tokenizers; training data
    {"modeldir", "evaluate"},  # the model-dir format; evaluation of a PyTorch LaVIN
    {"runtime", "training"},  # serving runtime (engine, sampling, generation); the training loop
    {"merge", "chat", "serve"},  # adapters folded into the base; the chat front end and the server, side by side
    {"quantize"},  # GPTQ on a merged model dir
    {"demo"},  # the packaged demo: built by merge + quantize, used by chat, serve and bench
    {"bench"},
    {"commands"},
    {"cli"},
]
LAYER_OF = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _graph() -> dict[str, set[str]]:
    """Module -> the lavin_edge modules it imports (a name imported from a package resolves to the package's
    __init__ unless it is a submodule)."""
    mods = {_module_name(rel): (rel, tree) for rel, tree in _modules()}

    def resolve(name: str) -> str:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, (rel, tree) in mods.items():
        deps = {resolve(n) for n in _imports(rel, tree) if n.startswith("lavin_edge")}
        graph[mod] = deps - {mod, ""}
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for mod, deps in sorted(graph.items()):
        src = _top(mod)
        for dep in sorted(deps):
            dst = _top(dep)
            if not src or not dst or src == dst:
                continue
            if src not in LAYER_OF or dst not in LAYER_OF:
                out.append(f"{mod} -> {dep}: {src if src not in LAYER_OF else dst} is in no layer of LAYERS")
            elif LAYER_OF[dst] >= LAYER_OF[src]:
                out.append(f"{mod} -> {dep}")
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_imports_point_down_the_layers() -> None:
    """kernels -> model -> runtime -> chat / serve -> commands: the runtime stack imports nothing from chat,
    serve, bench, commands, demo, merge, quantize or training."""
    assert LAYER_OF["kernels"] < LAYER_OF["model"] < LAYER_OF["runtime"] < LAYER_OF["chat"] < LAYER_OF["commands"]
    assert LAYER_OF["runtime"] < min(LAYER_OF[p] for p in ("serve", "bench", "demo", "merge", "quantize"))
    assert not _upward_imports(_graph()), _upward_imports(_graph())


def test_no_module_cycles() -> None:
    assert not _cycles(_graph()), _cycles(_graph())


def test_layer_and_cycle_checks_catch_what_they_look_for() -> None:
    """An upward import, a sideways one, a module in no layer and a three-module cycle are each found."""
    graph = {"lavin_edge.runtime.a": {"lavin_edge.chat.b"}, "lavin_edge.chat.b": {"lavin_edge.serve.c"},
             "lavin_edge.serve.c": {"lavin_edge.runtime.a"}, "lavin_edge.model.d": {"lavin_edge.newpkg.e"}}
    assert _upward_imports(graph) == ["lavin_edge.chat.b -> lavin_edge.serve.c",
                                      "lavin_edge.model.d -> lavin_edge.newpkg.e: newpkg is in no layer of LAYERS",
                                      "lavin_edge.runtime.a -> lavin_edge.chat.b"]
    assert _cycles(graph) == [["lavin_edge.chat.b", "lavin_edge.runtime.a", "lavin_edge.serve.c"]]
    tree = ast.parse("def f():\n    from lavin_edge.chat import session\n")
    assert "lavin_edge.chat.session" in _imports("runtime/x.py", tree)  # a function-level import counts


def test_checks_catch_what_they_look_for() -> None:
    """The walkers above find a private read and a pipeline import when there is one."""
    tree = ast.parse("from lavin_edge.kernels.dispatch import _C\nimport lavin_edge.kernels as K\nK._C\n"
                     "from lavin_edge.quantize.gptq import rtn_quantize\n")
    found = _private_reads("runtime/x.py", tree, _aliases("runtime/x.py", tree))
    assert found == ["from lavin_edge.kernels.dispatch import _C", "K._C (lavin_edge.kernels)"]
    assert "lavin_edge.quantize.gptq" in _imports("runtime/x.py", tree)
