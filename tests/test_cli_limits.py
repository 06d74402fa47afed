"""Limits a new user runs into (issue 26, rows 3, 5, 6): --threads is bounded by the cores on every command that
takes it (lowered, with one warning line), `chat --max-new-tokens` beyond the context is said once and the
answer stops at the context's end, and Ctrl-C at the REPL's empty prompt exits with 130."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_engine import trained_like
from test_repl_input import ENV, _read_until
from test_serve_batch import quantized_tiny_dir

from lavin_edge.cli import SUBCOMMANDS, main
from lavin_edge.merge import merge_lavin, save_merged


def available_cores() -> int:
    return len(os.sched_getaffinity(0))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    merged, table = merge_lavin(trained_like(1))
    return save_merged(merged, tmp_path_factory.mktemp("m"), None, {}, table)


def _commands() -> list[tuple[str, click.Command]]:
    """Every subcommand, bench's included."""
    out = []
    for name in SUBCOMMANDS:
        cmd = main.get_command(click.Context(main), name)
        subs = cmd.commands.items() if isinstance(cmd, click.Group) else [("", cmd)]
        out += [(f"{name} {sub}".strip(), c) for sub, c in subs]
    return out


def test_threads_bounded_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    cores = available_cores()
    taking = []
    for name, cmd in _commands():
        opt = next((p for p in cmd.params if p.name == "threads"), None)
        if opt is None:
            continue
        taking.append(name)
        ctx = click.Context(cmd)

        def process(value: str, opt: click.Parameter = opt, ctx: click.Context = ctx) -> int:
            """One value through the option (a list of thread counts takes it as a list of one)."""
            if opt.multiple:
                (out,) = opt.process_value(ctx, (value,))
                return out
            return opt.process_value(ctx, value)

        assert process(str(cores + 1)) == cores, name
        assert process("100000") == cores, name
        assert process(str(cores)) == cores, name
        with pytest.raises(click.BadParameter):
            process("0")
        assert "lowered" in (opt.help or ""), name  # the rule is in --help
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and all(line.startswith("warning: --threads ") for line in err), (name, err)
        assert f"the {cores} cores" in err[1] and err[1].endswith(f"using {cores}")
    assert {"chat", "serve", "train", "eval", "bench kernels", "bench chat"} <= set(taking), taking


def test_chat_with_far_too_many_threads_answers(model_dir: Path) -> None:
    """In a child process: before the bound, 100000 threads crashed the process (a segfault)."""
    res = subprocess.run([sys.executable, "-m", "lavin_edge.cli", "chat", "--model", str(model_dir), "--backend",
                          "torch", "--prompt", "Say hi", "--max-new-tokens", "2", "--threads", "100000"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [line for line in res.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: --threads 100000 is more than the {available_cores()} cores this process may use: using "
        f"{available_cores()}"]


def _notes(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("note:")]


@pytest.mark.parametrize("engine", ["torch", "no-torch"])
def test_max_new_tokens_beyond_the_context_is_said_once(model_dir: Path, tmp_path: Path, engine: str) -> None:
    """The PyTorch session and the one-shot engine without PyTorch (greedy text on a quantized model)."""
    d = model_dir if engine == "torch" else quantized_tiny_dir(tmp_path, max_seq_len=96)
    args = ["chat", "--model", str(d), "--prompt", "Say hi", "--max-new-tokens", "99999999999", "--stop", "\x00"]
    if engine == "torch":
        args += ["--backend", "torch", "--temperature", "1", "--seed", "0"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    (note,) = _notes(res.stderr)
    assert "--max-new-tokens 99999999999 is more than the context leaves: at most" in note, note
    room = int(note.split("at most ")[1].split()[0])
    assert 0 < room < 1000
    # Asking for exactly what is left says nothing.
    res = CliRunner().invoke(main, [*args[:6], str(room), *args[7:]])
    assert res.exit_code == 0 and _notes(res.stderr) == [], res.stderr


def test_max_new_tokens_beyond_the_context_in_the_repl(model_dir: Path) -> None:
    res = CliRunner().invoke(main, ["chat", "--model", str(model_dir), "--backend", "torch", "--max-new-tokens",
                                    "99999999999", "--json"], input="one\ntwo\n")
    assert res.exit_code == 0, res.output
    (note,) = _notes(res.stderr)
    assert "each answer stops where the context ends" in note


def test_ctrl_c_at_the_empty_prompt_exits_130(model_dir: Path) -> None:
    """What the terminal does on Ctrl-C: SIGINT to the chat process, here while it waits at `>>> `."""
    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "lavin_edge.cli", "chat", "--model", str(model_dir), "--backend", "torch",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    buf = bytearray()
    try:
        assert _read_until(master, buf, b">>> ", 0, 120) >= 0, buf.decode(errors="replace")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)  # a loaded 2-core machine can take a while to tear down
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 130, (proc.returncode, buf.decode(errors="replace"))
    assert b"Traceback" not in buf
