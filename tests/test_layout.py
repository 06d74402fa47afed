"""Module hygiene the layout relies on (issue 13): no module reads another module's underscored names, and
the runtime reaches the merge and quantize steps only through its loading seam."""

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


def test_checks_catch_what_they_look_for() -> None:
    """The walkers above find a private read and a pipeline import when there is one."""
    tree = ast.parse("from lavin_edge.kernels.dispatch import _C\nimport lavin_edge.kernels as K\nK._C\n"
                     "from lavin_edge.quantize.gptq import rtn_quantize\n")
    found = _private_reads("runtime/x.py", tree, _aliases("runtime/x.py", tree))
    assert found == ["from lavin_edge.kernels.dispatch import _C", "K._C (lavin_edge.kernels)"]
    assert "lavin_edge.quantize.gptq" in _imports("runtime/x.py", tree)
