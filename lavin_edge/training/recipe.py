"""Reading and checking a training recipe (``recipes/*.toml``) before anything is loaded.

Every key of the recipe, of each ``[[data]]`` table and of the ``[eval]`` table is checked here (name, type,
range, the files it names), so that a typo fails in a second with the file and line, not after the model has
loaded. A value given on the command line is named by its flag (``--lr``) instead of a line."""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["DATA_KEYS", "EVAL_KEYS", "RecipeError", "Locator", "check_recipe", "read_toml"]


class RecipeError(ValueError):
    """A recipe (or a flag overriding it) that cannot be used; the message names the file and line or flag."""


# The keys each [[data]] source type reads (lavin_edge.data.sources.load_source; tests/test_recipe.py checks
# that the two agree).
DATA_KEYS: dict[str, dict[str, str]] = {
    "scienceqa": {"type": "str", "name": "str", "root": "dir", "split": "str", "explanation": "bool"},
    "llava": {"type": "str", "name": "str", "path": "file", "image_folder": "dir"},
    "alpaca": {"type": "str", "name": "str", "path": "file"},
    "easy-vqa": {"type": "str", "name": "str", "split": "str", "mode": "str", "limit": "count", "seed": "int",
                 "kinds": "list[str]", "balance": "bool", "explain": "bool"},
    "easy-vqa-chat": {"type": "str", "name": "str", "split": "str", "limit": "count", "seed": "int",
                      "min_turns": "count", "max_turns": "count"},
    "self-distill": {"type": "str", "name": "str", "path": "file", "split": "str", "limit": "count", "seed": "int"},
    "prose": {"type": "str", "name": "str", "limit": "count", "seed": "int"},
}
REQUIRED_DATA_KEYS = {"scienceqa": ("root",), "llava": ("path",), "alpaca": ("path",), "easy-vqa": (),
                      "easy-vqa-chat": (), "self-distill": (), "prose": ()}
# [eval] is a data table plus how to evaluate (lavin_edge.evaluate.run_eval_spec).
EVAL_KEYS = {"method": "str", "max_new_tokens": "count", "limit": "count"}
CHOICES: dict[str, tuple[str, ...]] = {
    "base_dtype": ("auto", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16"),
    "device": ("cpu", "cuda"),
    "mode": ("open", "mc"),
    "method": ("generate", "score"),
    "kinds": ("yes/no", "yes/no:shape", "yes/no:color", "shape", "color"),
    "text_loss": ("ce", "kl"),
}
EASY_VQA_SPLITS = ("train", "test")

# name -> (test, what it must be)
_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "adapter_hidden": (lambda v: v >= 1, ">= 1"),
    "temperature": (lambda v: v > 0, "> 0"),
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "max_seq_len": (lambda v: v >= 2, ">= 2"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "accum_steps": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v > 0, "> 0"),
    "max_steps": (lambda v: v >= 1, ">= 1"),
    "warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "base_lr": (lambda v: v >= 0, ">= 0"),
    "lr": (lambda v: v >= 0, ">= 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "save_every": (lambda v: v >= 0, ">= 0 (0: only at the end)"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v >= 1, ">= 1"),
    "num_workers": (lambda v: v >= 0, ">= 0"),
}


def read_toml(path: str | Path) -> tuple[dict[str, Any], str]:
    """(the parsed recipe, its text); a syntax error names the file, line and column."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {p} cannot be read: {e}") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: TOML syntax error: {e}") from None


class Locator:
    """Where a key came from: ``FILE:LINE`` of the recipe, or the flag that overrode it."""

    def __init__(self, path: str | Path | None = None, text: str = "", flags: Mapping[str, str] | None = None
                 ) -> None:
        self.path, self.lines, self.flags = path, text.splitlines(), dict(flags or {})

    def _header_lines(self, header: str) -> list[int]:
        pat = re.compile(r"^\s*" + re.escape(header) + r"\s*(#.*)?$")
        return [i for i, line in enumerate(self.lines) if pat.match(line)]

    def _find_key(self, key: str, start: int) -> int | None:
        pat = re.compile(r"^\s*(" + re.escape(key) + r"|\"" + re.escape(key) + r"\")\s*=")
        for i in range(start, len(self.lines)):
            if i > start and re.match(r"^\s*\[", self.lines[i]):
                return None
            if pat.match(self.lines[i]):
                return i
        return None

    def where(self, key: str, table: str | None = None, index: int = 0) -> str:
        """``FILE:LINE`` (or ``FILE``) of ``key``, top-level or in the ``index``-th ``table``; ``--flag`` if a
        command-line flag set it."""
        if table is None and key in self.flags:
            return self.flags[key]
        if self.path is None:
            return "recipe" if table is None else f"recipe [{table}]"
        line: int | None = None
        if table is None:
            line = self._find_key(key, 0)
        else:
            headers = self._header_lines(f"[[{table}]]" if table == "data" else f"[{table}]")
            if index < len(headers):
                line = self._find_key(key, headers[index]) if key else headers[index]
            elif not headers:  # an inline table: `eval = {type = "easy-vqa", ...}`
                line = self._find_key(table, 0)
        return f"{self.path}:{line + 1}" if line is not None else str(self.path)


def _type_ok(value: Any, kind: str) -> bool:
    if kind in ("str", "file", "dir"):
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "count"):
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(x, str) for x in value)
    raise AssertionError(kind)


_KIND_WORDS = {"str": "a string", "file": "a file path", "dir": "a directory path", "bool": "true or false",
               "int": "an integer", "count": "an integer >= 1", "float": "a number",
               "list[str]": "a list of strings"}


def _field_kind(annotation: str) -> tuple[str, bool]:
    """A TrainConfig field's annotation -> (kind for _type_ok or a structural kind, None allowed)."""
    parts = [p.strip() for p in annotation.split("|")]
    optional = "None" in parts
    parts = [p for p in parts if p != "None"]
    if parts == ["int"]:
        return "int", optional
    if parts == ["float"]:
        return "float", optional
    if parts == ["str"]:
        return "str", optional
    if parts == ["bool"]:
        return "bool", optional
    if parts[0].startswith("tuple"):
        return "pair", optional
    if parts[0].startswith("list"):
        return "tables", optional
    if parts[0].startswith("dict"):
        return "eval", optional
    raise AssertionError(annotation)


def _check_source(spec: Any, loc: Locator, table: str, index: int, extra: Mapping[str, str]) -> None:
    here = loc.where("", table, index)
    label = f"[[{table}]] #{index + 1}" if table == "data" else f"[{table}]"
    if not isinstance(spec, dict):
        raise RecipeError(f"{here}: {label} must be a table, got {spec!r}")
    kind = spec.get("type")
    if kind not in DATA_KEYS:
        raise RecipeError(f"{loc.where('type', table, index)}: {label} type {kind!r} is not a data source type; "
                          f"valid: {', '.join(DATA_KEYS)}")
    known = {**DATA_KEYS[kind], **extra}
    for key, value in spec.items():
        at = loc.where(key, table, index)
        if key not in known:
            raise RecipeError(f"{at}: unknown key {key!r} in {label} (type {kind!r}); valid keys: "
                              f"{', '.join(sorted(known))}")
        want = known[key]
        if not _type_ok(value, want) or (want == "count" and value < 1):
            raise RecipeError(f"{at}: {label} {key} must be {_KIND_WORDS[want]}, got {value!r}")
        if want == "file" and not Path(value).is_file():
            raise RecipeError(f"{at}: {label} {key}: file {value} not found")
        if want == "dir" and not Path(value).is_dir():
            raise RecipeError(f"{at}: {label} {key}: directory {value} not found")
        choices = CHOICES.get(key)
        bad = [v for v in (value if isinstance(value, list) else [value]) if choices and v not in choices]
        if bad:
            raise RecipeError(f"{at}: {label} {key} {bad[0]!r} is not valid; valid: {', '.join(choices or ())}")
        if kind in ("easy-vqa", "easy-vqa-chat", "self-distill") and key == "split" and value not in EASY_VQA_SPLITS:
            raise RecipeError(f"{at}: {label} split {value!r} is not valid; valid: "
                              f"{', '.join(EASY_VQA_SPLITS)}")
    for key in REQUIRED_DATA_KEYS[kind]:
        if key not in spec:
            raise RecipeError(f"{here}: {label} (type {kind!r}) needs {key!r}")
    if kind == "scienceqa":
        for name in ("problems.json", "pid_splits.json"):
            if not (Path(spec["root"]) / name).is_file():
                raise RecipeError(f"{loc.where('root', table, index)}: {label} root {spec['root']} has no {name} "
                                  "(a ScienceQA root holds problems.json, pid_splits.json and images/)")
    if spec.get("explain") and spec.get("mode", "open") != "open":
        raise RecipeError(f"{loc.where('explain', table, index)}: {label} explain needs mode 'open'")


def check_recipe(d: Mapping[str, Any], fields: Mapping[str, str], loc: Locator | None = None) -> None:
    """Check a recipe dict (after flags were applied) against ``fields`` (TrainConfig's field name ->
    annotation); raises RecipeError naming the file and line (or the flag) and the valid values."""
    loc = loc or Locator()
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise RecipeError(f"{loc.where(unknown[0])}: unknown recipe key {unknown[0]!r}; valid keys: "
                          f"{', '.join(sorted(fields))}")
    for key, value in d.items():
        kind, optional = _field_kind(fields[key])
        at = loc.where(key)
        if value is None:
            if optional:
                continue
            raise RecipeError(f"{at}: {key} cannot be empty")
        if kind == "pair":
            ok = (isinstance(value, list | tuple) and len(value) == 2 and all(
                _type_ok(x, "float") and 0 <= x < 1 for x in value))
            if not ok:
                raise RecipeError(f"{at}: {key} must be two numbers in [0, 1), got {value!r}")
            continue
        if kind == "tables":
            if not isinstance(value, list) or not value:
                raise RecipeError(f"{at}: the recipe needs at least one [[data]] table (a source: "
                                  f"{', '.join(DATA_KEYS)})")
            for i, spec in enumerate(value):
                _check_source(spec, loc, "data", i, {})
                if isinstance(spec, dict) and spec.get("type") == "prose" and d.get("text_loss", "ce") != "kl":
                    raise RecipeError(f"{loc.where('type', 'data', i)}: [[data]] #{i + 1} type 'prose' needs "
                                      "text_loss = \"kl\" (prose is scored against the frozen base's predictions)")
            continue
        if kind == "eval":
            if value is False:
                continue
            _check_source(value, loc, "eval", 0, EVAL_KEYS)
            continue
        if not _type_ok(value, kind):
            raise RecipeError(f"{at}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
        if kind == "float" and not math.isfinite(value):
            raise RecipeError(f"{at}: {key} must be a finite number, got {value!r}")
        if key in CHOICES and value not in CHOICES[key]:
            raise RecipeError(f"{at}: {key} {value!r} is not valid; valid: {', '.join(CHOICES[key])}")
        rule = _RANGES.get(key)
        if rule is not None and not rule[0](value):
            raise RecipeError(f"{at}: {key} must be {rule[1]}, got {value!r}")
        if key in _BASES:
            _check_base(key, value, at)
        if key == "init_adapters" and not (Path(value).is_file() or (Path(value) / "adapters.safetensors").is_file()):
            raise RecipeError(f"{at}: init_adapters {value}: no adapters.safetensors there (expected a `lavin-edge "
                              "train` run dir or its adapters.safetensors)")


# Named bases besides paths and presets (lavin_edge.training.base).
_BASES = {"llm": ("smollm2-135m",), "vision": ("efficientnet-lite0",)}
_BASE_WHAT = {"llm": "a checkpoint path (HF dir, Meta dir, .gguf)", "vision": "a CLIP checkpoint path"}


def _check_base(key: str, value: str, at: str) -> None:
    from lavin_edge.config import LLM_PRESETS, VISION_PRESETS

    presets = LLM_PRESETS if key == "llm" else VISION_PRESETS
    if value.startswith("preset:"):
        if value.removeprefix("preset:") not in presets:
            raise RecipeError(f"{at}: {key} {value!r}: no such preset; valid: "
                              f"{', '.join('preset:' + n for n in sorted(presets))}")
        return
    if value in _BASES[key] or Path(value).exists():
        return
    raise RecipeError(f"{at}: {key} {value!r} not found; valid: {_BASE_WHAT[key]}, "
                      f"{', '.join(_BASES[key])}, or preset:NAME ({', '.join(sorted(presets))})")
