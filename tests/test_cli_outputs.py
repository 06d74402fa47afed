"""What `merge`, `quantize` and `train` do with an output that already exists (issue 26, rows 1, 4, 9, 10, 11):
--overwrite replaces only an earlier output of the same kind, a run killed mid-write leaves a temporary
directory the next run removes (and says so), an already-quantized input and a model dir given to `train --out`
are one short line each, and `merge` shows its progress on stderr."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_engine import trained_like
from test_serve_batch import quantized_tiny_dir
from test_train_rundir import _recipe

from lavin_edge.cli import main
from lavin_edge.merge import merge_lavin, save_merged

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args: str):  # noqa: ANN202
    return CliRunner().invoke(main, list(args))


def _error_line(res, code: int = 2) -> str:  # noqa: ANN001
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _user_dir(root: Path) -> Path:
    d = root / "out"
    d.mkdir()
    (d / "userfile.txt").write_text("my notes")
    return d


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete `lavin-edge train`-style run dir on a preset base rebuilt from its seed."""
    from lavin_edge.config import AdapterConfig
    from lavin_edge.io.outdir import write_marker
    from lavin_edge.training.base import BaseSpec, build_base
    from lavin_edge.training.checkpoint import save_adapters, save_json

    spec = BaseSpec("preset:tiny", "preset:tiny", None, 3)
    model, _, _ = build_base(spec, AdapterConfig())
    art = tmp_path_factory.mktemp("art") / "run"
    save_adapters(model.trainable_state_dict(), art)
    save_json({"lavin_config": model.cfg.to_dict(), "base": spec.to_dict()}, art / "config.json")
    write_marker(art, format="lavin-edge-run")
    return art


def test_merge_overwrite_replaces_only_an_earlier_model(tmp_path: Path, artifact: Path) -> None:
    out = _user_dir(tmp_path)
    line = _error_line(_run("merge", str(artifact), str(out), "--overwrite"))
    assert "--overwrite replaces only" in line and "nothing was deleted" in line
    assert [p.name for p in out.iterdir()] == ["userfile.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An empty dir, then the earlier merge output itself, are replaced; progress on stderr, as quantize's.
    (out / "userfile.txt").unlink()
    res = _run("merge", str(artifact), str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    assert "merge" in res.stderr and "3/3" in res.stderr and "merged ->" in res.stdout
    res = _run("merge", str(artifact), str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    # A training run is not what merge writes: refused even with --overwrite.
    line = _error_line(_run("merge", str(out), str(artifact), "--overwrite"))
    assert "training run" in line or "input" in line


def test_a_killed_merge_leaves_a_temp_dir_the_next_merge_removes(tmp_path: Path, artifact: Path) -> None:
    """kill -9 while `merge` writes: the next `merge` into the same OUT removes the hidden temporary sibling
    and says so on stderr."""
    out = tmp_path / "merged"
    code = ("import os, signal, sys\n"
            "import safetensors.torch as st\n"
            "from lavin_edge.cli import main\n"
            "def killed(*a, **k):\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "st.save_file = killed\n"
            "main(['merge', sys.argv[1], sys.argv[2]])\n")
    res = subprocess.run([sys.executable, "-c", code, str(artifact), str(out)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1])
    assert res.returncode == -9, res.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".merged.tmp-"), left
    res = _run("merge", str(artifact), str(out))
    assert res.exit_code == 0, res.output
    assert "warning: removed" in res.stderr and left[0] in res.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_quantize_overwrite_and_an_already_quantized_input(tmp_path: Path) -> None:
    q = quantized_tiny_dir(tmp_path / "models")
    fp = q.parent / "fp"
    out = _user_dir(tmp_path)
    line = _error_line(_run("quantize", str(fp), str(out), "--overwrite"))
    assert "replaces only" in line and (out / "userfile.txt").read_text() == "my notes"
    line = _error_line(_run("quantize", str(q), str(tmp_path / "x")))
    assert "already quantized (4-bit, group size 32)" in line and "merge" in line
    assert len(line) - len(str(q)) < 150 and "{" not in line


def test_train_out_a_model_dir_or_user_files(tmp_path: Path) -> None:
    merged, table = merge_lavin(trained_like(1))
    model = save_merged(merged, tmp_path / "model", None, {}, table)
    for out in (model, _user_dir(tmp_path)):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        recipe = _recipe(tmp_path / "r.toml", out)
        for extra in ((), ("--overwrite",), ("--resume",)):
            line = _error_line(_run("train", str(recipe), *extra))
            assert "is not a training run" in line and "step None" not in line, line
            what = "a lavin-edge model (the output of merge or quantize)" if out == model else "did not write"
            assert what in line, line
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before

