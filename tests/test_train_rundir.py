"""``train``'s run dir and recipe checks (issue 16): an existing run is refused unless --resume or --overwrite, a
resume with other settings is refused by name, every recipe key is checked before anything loads (file and line
in the message), the evaluation after training shows progress and can be turned off, and a process killed at
each write step of a save leaves the run dir complete or refused, never a mix that resume or merge accepts."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lavin_edge.cli import main as cli_main
from lavin_edge.io.outdir import COMPLETE_MARKER, OutputDirError, require_complete
from lavin_edge.training.config import TrainConfig
from lavin_edge.training.loop import train
from lavin_edge.training.recipe import DATA_KEYS, EVAL_KEYS

ROOT = Path(__file__).resolve().parents[1]


def _recipe(path: Path, out: Path, extra: str = "", data_extra: str = "", **kw: object) -> Path:
    keys: dict[str, object] = {"llm": "preset:tiny", "vision": "preset:tiny", "max_seq_len": 96, "epochs": 1,
                               "warmup_epochs": 0.25, "lr": 5e-3, "threads": 1, "progress": False, "max_steps": 2,
                               "out_dir": str(out), **kw}
    lines = [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    lines += [extra, "", "[[data]]", 'type = "easy-vqa"', 'split = "train"', "limit = 24", data_extra]
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(*args: str):  # noqa: ANN202
    return CliRunner().invoke(cli_main, ["train", *args])


def _one_line_error(res, code: int = 2) -> str:  # noqa: ANN001
    assert res.exit_code == code, (res.exit_code, res.output)
    err = res.stderr
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ the run dir

def test_existing_run_refused_unless_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.toml", out)
    assert _train(str(recipe)).exit_code == 0
    assert json.loads((out / COMPLETE_MARKER).read_text())["step"] == 2
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    msg = _one_line_error(_train(str(recipe)))
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # untouched, the log not appended
    msg = _one_line_error(_train(str(recipe), "--resume", "--overwrite"))
    assert "choose one" in msg
    # A finished run has nothing to resume.
    msg = _one_line_error(_train(str(recipe), "--resume"))
    assert "finished" in msg and "--max-steps" in msg
    # --overwrite starts over: the log holds the new run's steps only.
    res = _train(str(recipe), "--overwrite", "--seed", "5")
    assert res.exit_code == 0, res.output
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    require_complete(out)


def test_resume_refuses_settings_that_differ(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.toml", out, save_every=1)
    assert _train(str(recipe), "--max-steps", "1").exit_code == 0
    msg = _one_line_error(_train(str(recipe), "--resume", "--lr", "0.5"))
    assert "lr 0.5" in msg and "0.005" in msg and "--lr" in msg
    msg = _one_line_error(_train(str(recipe), "--resume", "--epochs", "3", "--batch-size", "2"))
    assert "epochs" in msg and "batch_size" in msg
    res = _train(str(recipe), "--resume", "--max-steps", "2", "--threads", "1")  # allowed to change
    assert res.exit_code == 0, res.output
    assert "resumed from" in res.stderr and "lr 0.005" in res.stderr


def test_shipped_demo_adapters_are_complete() -> None:
    """merge refuses a run dir without the completeness marker: the packaged demo adapters carry one (write it
    again with lavin_edge.io.outdir.write_marker after replacing their files)."""
    from lavin_edge.demo.paths import ADAPTERS_DIR

    require_complete(ADAPTERS_DIR)


def test_resume_of_nothing_and_of_a_file(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r.toml", tmp_path / "none")
    assert "holds no run" in _one_line_error(_train(str(recipe), "--resume"))
    (tmp_path / "file").write_text("x")
    assert "not a directory" in _one_line_error(_train(str(recipe), "--out", str(tmp_path / "file")))


# ------------------------------------------------------------------------------------------------ recipe checks

@pytest.mark.parametrize("case", ["negative_in_recipe", "negative_lr_flag", "unknown_data_key", "toml_syntax",
                                  "bad_mode", "unknown_top_key", "bad_type", "bad_preset", "missing_root"])
def test_recipe_checked_before_anything_loads(tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lavin_edge.training.loop as train_mod

    def no_loading(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded before the recipe was checked")

    monkeypatch.setattr(train_mod, "build_base", no_loading)
    monkeypatch.setattr(train_mod, "base_configs", no_loading)
    out = tmp_path / "out"
    args: list[str] = ["--dry-run"]
    want: tuple[str, ...]
    if case == "negative_in_recipe":
        recipe = _recipe(tmp_path / "r.toml", out, weight_decay=-0.5)
        want = ("r.toml:", "weight_decay must be >= 0", "-0.5")
    elif case == "negative_lr_flag":
        recipe, args = _recipe(tmp_path / "r.toml", out), ["--dry-run", "--lr", "-0.1"]
        want = ("--lr", "-0.1")
    elif case == "unknown_data_key":
        recipe = _recipe(tmp_path / "r.toml", out, data_extra="limt = 3")
        want = ("r.toml:17", "unknown key 'limt'", "[[data]]", "limit", "kinds")
    elif case == "toml_syntax":
        recipe = _recipe(tmp_path / "r.toml", out, extra="seed = 1 2")
        want = ("r.toml", "line 11", "TOML")
    elif case == "bad_mode":
        recipe = _recipe(tmp_path / "r.toml", out, data_extra='mode = "closed"')
        want = ("r.toml:17", "mode 'closed'", "open, mc")
    elif case == "unknown_top_key":
        recipe = _recipe(tmp_path / "r.toml", out, extra="batchsize = 4")
        want = ("r.toml:11", "unknown recipe key 'batchsize'", "batch_size")
    elif case == "bad_type":
        recipe = _recipe(tmp_path / "r.toml", out, extra='batch_size = "four"')
        want = ("r.toml:11", "batch_size must be an integer")
    elif case == "bad_preset":
        recipe, args = _recipe(tmp_path / "r.toml", out), ["--dry-run", "--llm", "preset:huge"]
        want = ("--llm", "preset:huge", "preset:tiny")
    else:
        recipe = _recipe(tmp_path / "r.toml", out, extra='eval = {type = "scienceqa", root = "/no/such"}')
        want = ("r.toml:11", "directory /no/such not found")
    msg = _one_line_error(_train(str(recipe), *args))
    for w in want:
        assert w in msg, (w, msg)
    assert not out.exists()


def test_recipe_key_tables_match_what_the_loaders_read() -> None:
    """DATA_KEYS/EVAL_KEYS mirror load_source and run_eval_spec: a key one of them reads must be accepted."""
    from lavin_edge.data.sources import load_source
    from lavin_edge.evaluate import run_eval_spec

    read = set(re.findall(r'spec(?:\.get\(|\[)"([^"]+)"', inspect.getsource(load_source)))
    assert read == set().union(*DATA_KEYS.values())
    popped = set(re.findall(r'spec\.pop\("([^"]+)"', inspect.getsource(run_eval_spec)))
    assert popped <= set(EVAL_KEYS)


# ------------------------------------------------------------------------------------------------ evaluation

def test_eval_after_training_shows_progress_and_can_be_skipped(tmp_path: Path) -> None:
    ev = '\n[eval]\ntype = "easy-vqa"\nsplit = "test"\nlimit = 2\nmax_new_tokens = 2\n'
    recipe = tmp_path / "r.toml"
    _recipe(recipe, tmp_path / "a", max_steps=1, progress=True)
    recipe.write_text(recipe.read_text() + ev)
    res = _train(str(recipe))
    assert res.exit_code == 0, res.output
    assert "eval: 100%" in res.stderr and "--no-eval" in res.stderr
    assert (tmp_path / "a" / "eval.json").is_file()
    require_complete(tmp_path / "a")  # the marker was written again, with eval.json
    res = _train(str(recipe), "--no-eval", "--out", str(tmp_path / "b"))
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "b" / "eval.json").exists() and "eval:" not in res.stderr
    recipe.write_text(recipe.read_text().replace("[eval]", "[not_eval]"))
    res = _train(str(recipe), "--out", str(tmp_path / "c"))
    assert res.exit_code == 2  # an unknown table is refused, not skipped


# ------------------------------------------------------------------------------------------------ fault injection

# Forks one child per kill point (after the imports, which take most of a run's time); each child's hook
# SIGKILLs it right before the k-th write of its saves (k = 0: never).
KILL_SCRIPT = """
import json, os, signal, sys
import lavin_edge.training.loop as t
import lavin_edge.training.save as save
from lavin_edge.training.config import TrainConfig
cfgs, ks = json.loads(sys.argv[1]), json.loads(sys.argv[2])
result = {}
for k, cfg in zip(ks, cfgs):
    pid = os.fork()
    if pid == 0:
        names = []
        def hook(what):
            names.append(what)
            if len(names) == k:
                os.kill(os.getpid(), signal.SIGKILL)
        save._write_step = hook
        t.train(TrainConfig(**cfg), echo=lambda *a: None)
        print(json.dumps({"names": names}), flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    result[k] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
print(json.dumps(result), flush=True)
"""


def _run_kills(cfgs: list[dict], ks: list[int]) -> tuple[list[str], dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(cfgs), json.dumps(ks)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    return lines[:-1], json.loads(lines[-1])


def _cfg(out: Path, **kw: object) -> dict:
    return dict(data=[{"type": "easy-vqa", "split": "train", "limit": 24}], max_seq_len=96, batch_size=4, epochs=1,
                warmup_epochs=0.25, lr=5e-3, threads=1, progress=False, out_dir=str(out), max_steps=2,
                save_every=1, **kw)


def _steps(out: Path) -> set[int]:
    with safe_open(str(out / "adapters.safetensors"), "pt") as f:
        adapters_step = int(f.metadata()["step"])
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    return {adapters_step, json.loads((out / "config.json").read_text())["step"], int(state["step"])}


@pytest.mark.slow
def test_killed_at_every_write_step_leaves_complete_or_refused(tmp_path: Path) -> None:
    """~3 min on 2 busy cores: 24 kill points, each a 2-step run."""
    ref = tmp_path / "ref"
    child_lines, status = _run_kills([_cfg(ref)], [0])
    assert status == {"0": 0}
    names = json.loads(child_lines[0])["names"]
    n_writes = len(names)
    assert n_writes >= 20  # two saves, each: clean, stage 4 files (+ the plot), unmark, 4 (5) renames, marker
    second = names.index("clean", 1)
    unmark2 = names.index("unmark", second)
    final = load_file(str(ref / "adapters.safetensors"))
    ks = list(range(1, n_writes + 1))
    _, status = _run_kills([_cfg(tmp_path / f"k{k}") for k in ks], ks)
    assert all(status[str(k)] == 9 for k in ks), status  # SIGKILL, at every write step
    outcomes = []
    for k in ks:
        out = tmp_path / f"k{k}"
        cfg = TrainConfig(**_cfg(out))  # type: ignore[arg-type]
        try:
            require_complete(out)
        except OutputDirError:
            # Refused everywhere: resume, merge, eval; a fresh run needs --overwrite.
            with pytest.raises(OutputDirError):
                train(cfg, resume=True)
            if out.exists() and any(out.iterdir()):
                from lavin_edge.merge import load_trained
                from lavin_edge.training.base import read_run_config

                with pytest.raises(ValueError):
                    load_trained(out)
                with pytest.raises(ValueError):
                    read_run_config(out)
                with pytest.raises(OutputDirError, match="--overwrite"):
                    train(cfg)
            outcomes.append("refused")
            continue
        # Complete: one and the same step in every file, and the resumed run ends bit-exactly as the reference.
        assert len(_steps(out)) == 1, (k, _steps(out))
        train(cfg, resume=True, echo=lambda *a: None)
        got = load_file(str(out / "adapters.safetensors"))
        assert all(torch.equal(got[n], final[n]) for n in final), k
        outcomes.append("resumed")
    # Killed before the k-th write: the first save leaves nothing accepted until its marker; the second keeps
    # the first checkpoint complete while it stages its files, and is refused only from the unmark on.
    want = ["refused"] * second + ["resumed"] * (unmark2 + 1 - second) + ["refused"] * (n_writes - unmark2 - 1)
    assert outcomes == want, list(zip(names, outcomes, strict=True))


def test_bench_train_reports_the_run(tmp_path: Path) -> None:
    """`lavin-edge bench train` trains the recipe and reports what the run did, on stdout and in --report."""
    out = tmp_path / "run"
    recipe = _recipe(tmp_path / "r.toml", out, eval=False)
    report = tmp_path / "report.json"
    res = CliRunner().invoke(cli_main, ["bench", "train", "--recipe", str(recipe), "--report", str(report)])
    assert res.exit_code == 0, res.output
    got = json.loads(report.read_text())
    assert got == json.loads(res.stdout)
    assert got["steps"] == 2 and got["out_dir"] == str(out) and got["samples"] == 2 * got["global_batch"]
    assert got["adapter_bytes"] == (out / "adapters.safetensors").stat().st_size
    assert got["first_loss"] > 0 and got["last_loss"] > 0
