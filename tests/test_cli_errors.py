"""One error convention for every command (issue 16): bad input or usage -> one line on stderr, exit 2; an
internal error -> one line with a --debug hint, exit 1; Ctrl-C -> exit 130; a traceback only with --debug or
LAVIN_EDGE_DEBUG=1. And the `eval` rows: --limit -3/0, --data imagenet, merged/quantized/empty dirs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lavin_edge.cli import main


def _invoke(*args: str, env: dict[str, str] | None = None):  # noqa: ANN202
    return CliRunner().invoke(main, list(args), env=env)


def _one_line(res, code: int) -> str:  # noqa: ANN001
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.stderr
    return res.stderr


@pytest.mark.parametrize("args", [["nosuch"], ["train"], ["eval", "x"], ["chat", "--top-p", "2"],
                                  ["info", "--llm", "gpt-5"], ["quantize", "/no/such/dir", "/tmp/x"],
                                  ["merge", "/no/such/dir", "/tmp/y"]])
def test_usage_errors_are_one_line_exit_2(args: list[str]) -> None:
    _one_line(_invoke(*args), 2)


def test_internal_error_exit_1_traceback_only_with_debug(monkeypatch: pytest.MonkeyPatch) -> None:
    import lavin_edge.model.lavin as lavin

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("shape mismatch in a kernel")

    monkeypatch.setattr(lavin, "build_lavin", broken)
    err = _one_line(_invoke("info"), 1)
    assert "internal error: RuntimeError: shape mismatch" in err and "--debug" in err
    for res in (_invoke("--debug", "info"), _invoke("info", env={"LAVIN_EDGE_DEBUG": "1"})):
        assert res.exit_code == 1 and "Traceback" in res.stderr and "shape mismatch" in res.stderr


def test_bad_input_raised_by_the_project_is_exit_2_and_ctrl_c_is_130(monkeypatch: pytest.MonkeyPatch) -> None:
    import lavin_edge.model.lavin as lavin

    def bad(*a: object, **k: object) -> None:
        from lavin_edge.config import LlamaConfig

        # A plain ValueError raised by lavin-edge code is a message about the input.
        LlamaConfig(dim=7, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, vocab_size=8).validate()

    monkeypatch.setattr(lavin, "build_lavin", bad)
    assert "not divisible" in _one_line(_invoke("info"), 2)
    res = _invoke("--debug", "info")
    assert res.exit_code == 2 and "Traceback" in res.stderr  # --debug adds the traceback, keeps the code

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lavin, "build_lavin", interrupted)
    res = _invoke("info")
    assert res.exit_code == 130 and res.stderr.strip() == "error: interrupted"


def test_help_lists_debug() -> None:
    res = _invoke("--help")
    assert res.exit_code == 0 and "--debug" in res.stdout and "LAVIN_EDGE_DEBUG" in res.stdout


# ------------------------------------------------------------------------------------------------ eval rows

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lavin_edge.training.config import TrainConfig
    from lavin_edge.training.loop import train

    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=[{"type": "easy-vqa", "split": "train", "limit": 8}], max_seq_len=96, batch_size=4,
                      max_steps=1, threads=1, progress=False, out_dir=str(out)), echo=lambda *a: None)
    return out


@pytest.mark.parametrize("limit", ["-3", "0"])
def test_eval_limit_must_be_positive(run_dir: Path, limit: str) -> None:
    err = _one_line(_invoke("eval", str(run_dir), "--data", "easy-vqa", "--limit", limit), 2)
    assert "--limit" in err and "x>=1" in err


def test_eval_data_lists_the_valid_names(run_dir: Path) -> None:
    err = _one_line(_invoke("eval", str(run_dir), "--data", "imagenet"), 2)
    assert "'easy-vqa'" in err and "'easy-vqa-mc'" in err and "ScienceQA root" in err
    err = _one_line(_invoke("eval", str(run_dir), "--data", "easy-vqa", "--json", "/no/such/dir/r.json"), 2)
    assert "--json" in err  # refused before the evaluation, not after it


@pytest.mark.parametrize("kind", ["empty", "merged", "quantized", "missing", "incomplete"])
def test_eval_on_a_dir_that_is_not_a_run(tmp_path: Path, run_dir: Path, kind: str) -> None:
    d = tmp_path / kind
    if kind != "missing":
        d.mkdir()
    if kind in ("merged", "quantized"):
        cfg: dict = {"format": "lavin-edge-merged", "format_version": 1, "source": {"adapters": str(run_dir)}}
        if kind == "quantized":
            cfg["quantization_config"] = {"bits": 4}
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "model.safetensors").write_bytes(b"")
    if kind == "incomplete":
        for p in run_dir.iterdir():
            if p.name != "lavin-edge-complete.json":
                (d / p.name).write_bytes(p.read_bytes())
    err = _one_line(_invoke("eval", str(d), "--data", "easy-vqa", "--limit", "1"), 2)
    want = {"empty": "is empty", "merged": "is a merged model dir", "quantized": "is a quantized model dir",
            "missing": "no such directory", "incomplete": "incomplete"}[kind]
    assert want in err, err
    if kind in ("merged", "quantized"):
        assert str(run_dir) in err  # where the run dir it came from is
    if kind != "incomplete":
        assert "run dir of `lavin-edge train`" in err
