"""`--activations {15bit,int8}` (issue 14): every command that loads a 4-bit model takes it, it selects the CPU W4
kernels' activation format (through $LAVIN_EDGE_W4_ACT) before the command's body runs, and without it the
variable (default 15-bit) decides."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from lavin_edge.cli import main
from lavin_edge.commands import options
from lavin_edge.kernels import reference as R

ENGINE_COMMANDS = [["chat"], ["serve"], ["eval"], ["bench", "chat"], ["bench", "kernels"], ["bench", "quality"],
                   ["bench", "serve"]]


def test_option_values_match_the_kernels() -> None:
    assert options.ACT_ENV == R.ACT_ENV
    assert options.ACT_OPTION_VALUES == R.ACT_OPTION_VALUES
    assert set(R.ACT_OPTION_VALUES.values()) == set(R.ACT_FORMATS)


@pytest.mark.parametrize("cmd", ENGINE_COMMANDS, ids=" ".join)
def test_every_engine_command_documents_the_option(cmd: list[str]) -> None:
    res = CliRunner().invoke(main, [*cmd, "--help"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "--activations [15bit|int8]" in text and "LAVIN_EDGE_W4_ACT" in text


@pytest.mark.parametrize("args,env,want", [(["--activations", "int8"], "int16", "int8"),
                                           (["--activations", "15bit"], "int8", "int16"),
                                           ([], "int8", "int8"), ([], None, "int16")])
def test_option_selects_the_format_before_the_command_runs(args: list[str], env: str | None, want: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import lavin_edge.bench.kernels as KB

    seen: list[str] = []
    monkeypatch.setattr(KB, "run_kernel_bench", lambda **kw: seen.append(R.act_format()))
    monkeypatch.setenv(R.ACT_ENV, "int16")  # restored after the test, whatever the command sets
    if env is None:
        monkeypatch.delenv(R.ACT_ENV)
    else:
        monkeypatch.setenv(R.ACT_ENV, env)
    res = CliRunner().invoke(main, ["bench", "kernels", *args])
    assert res.exit_code == 0, res.output
    assert seen == [want]


def test_option_rejects_other_formats() -> None:
    res = CliRunner().invoke(main, ["bench", "kernels", "--activations", "int4"])
    assert res.exit_code == 2 and "15bit" in res.output + (res.stderr or "")
