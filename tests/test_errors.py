"""imgcls.errors.guarded, the CLI guard: every command behaves in a pipe whose reader stops early and on a
terminal of any encoding, ending with a status and at most a message, never a traceback."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from imgcls.errors import UserError, guarded

from .fixtures import REPO, cli, cli_env, experiment, make_data

# ---------------------------------------------------------------------------------- in-process


def read_then_close(fd: int, limit: int, got: list[bytes]) -> None:
    """A reader like `head -c limit`: reads up to limit bytes, then closes its end of the pipe."""
    while sum(map(len, got)) < limit:
        chunk = os.read(fd, min(65536, limit - sum(map(len, got))))
        if not chunk:
            break
        got.append(chunk)
    os.close(fd)


@given(
    text=st.text(max_size=50),
    repeat=st.integers(1, 20_000),
    reader_takes=st.integers(0, 300_000),
    encoding=st.sampled_from(["ascii", "latin-1", "utf-8", "cp1252"]),
)
@example(text="chat été, \u732b, caf\udce9", repeat=1, reader_takes=10**6, encoding="ascii")
@example(text="x" * 50, repeat=20_000, reader_takes=0, encoding="utf-8")  # 1 MB into a closed pipe
def test_output_into_a_pipe_of_any_reader_and_encoding_ends_quietly(text, repeat, reader_takes, encoding):
    """Whatever is printed, through whatever encoding, into a pipe whose reader takes any number of bytes
    and goes away: the command returns 0 (everything was read, every character the encoding lacks as
    its backslash escape) or 141 (the reader left first), and raises nothing."""
    payload = (text + "\n") * repeat
    r, w = os.pipe()
    got: list[bytes] = []
    reader = threading.Thread(target=read_then_close, args=(r, reader_takes, got))
    reader.start()
    stdout = io.TextIOWrapper(open(w, "wb", closefd=True), encoding=encoding)  # errors="strict", as a terminal's
    stderr = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", stdout)
        mp.setattr(sys, "stderr", stderr)

        def command() -> int:
            print(payload, end="")
            return 0

        status = guarded(command)
    stdout.close()
    reader.join(timeout=30)
    expected = payload.encode(encoding, "backslashreplace")
    if len(expected) <= reader_takes:
        assert status == 0 and b"".join(got) == expected
    else:
        assert status in (0, 141)
        assert expected.startswith(b"".join(got))
    stderr.seek(0)
    assert stderr.read() == ""


@given(message=st.text(max_size=80), encoding=st.sampled_from(["ascii", "latin-1", "utf-8"]))
@example(message=os.fsdecode(b"caf\xe9/\xc3\xa9t\xc3\xa9.png: unreadable"), encoding="ascii")
def test_an_error_message_prints_on_a_terminal_of_any_encoding(message, encoding):
    stderr = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stderr", stderr)

        def command() -> int:
            raise UserError(message)

        assert guarded(command) == 2
    stderr.seek(0)
    assert stderr.buffer.read() == f"error: {message}\n".encode(encoding, "backslashreplace")


# ---------------------------------------------------------------------------------- commands


@pytest.mark.slow
def test_every_command_stops_quietly_when_the_reader_of_its_output_goes_away(trained, tmp_path):
    """`python -m imgcls.X ... | head -1` with a reader gone before the first byte: exit 141, no traceback."""
    base, exp_path, run_dir = trained
    ckpt = str(run_dir / "best.safetensors")
    commands = {
        "config --reference": ("config", "--reference"),
        "config": ("config", str(exp_path)),
        "run --dry-run": ("run", str(exp_path), "--dry-run"),
        "predict": ("predict", str(exp_path), ckpt, "data/val"),
        "predict --csv": ("predict", str(exp_path), ckpt, "data/val", "--csv"),
        "predict --json": ("predict", str(exp_path), ckpt, "data/val", "--json"),
        "evaluate --json": ("evaluate", str(exp_path), ckpt, "--json"),
    }
    procs = {}
    for name, (module, *args) in commands.items():
        procs[name] = cli(module, *args, cwd=base)
        procs[name].stdout.close()  # the reader is gone before the command writes
    deadline = time.monotonic() + 300
    for name, proc in procs.items():
        proc.wait(timeout=max(1, deadline - time.monotonic()))
        err = proc.stderr.read()
        assert proc.returncode == 141, (name, proc.returncode, err)
        assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, (name, err)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("head") is None, reason="needs head(1)")
def test_predict_piped_into_head_prints_one_line_and_ends_quietly(trained):
    base, exp_path, run_dir = trained
    command = f"{sys.executable} -m imgcls.predict {exp_path} {run_dir / 'best.safetensors'} data/val data/train | head -1"
    result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=base, env=cli_env(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode in (0, 141), result.stderr
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1


@pytest.mark.slow
def test_non_ascii_paths_and_names_print_on_an_ascii_terminal(trained, tmp_path):
    """PYTHONIOENCODING=ascii: predict's three formats and the config check print, escaping what ASCII lacks."""
    base, exp_path, run_dir = trained
    folder = tmp_path / "photos été" / "\u732b"
    shutil.copytree(base / "data" / "val" / "cat", folder)
    (folder / "bad \u00e9.png").write_bytes(b"not an image")
    env = cli_env(PYTHONIOENCODING="ascii")
    ckpt = str(run_dir / "best.safetensors")
    procs = {fmt: cli("predict", str(exp_path), ckpt, str(folder), *flag, cwd=base, env=env)
             for fmt, flag in (("text", []), ("csv", ["--csv"]), ("json", ["--json"]))}
    make_data(tmp_path / "données")
    config_exp = experiment(tmp_path, {"data": {"train_dir": str(tmp_path / "données" / "data" / "train"),
                                                "val_dir": str(tmp_path / "données" / "data" / "val")}}, "é.toml")
    procs["config"] = cli("config", str(config_exp), cwd=base, env=env)
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == (1 if name != "config" else 0), (name, err)
        assert "Traceback" not in err, (name, err)
        out.encode("ascii")
        if name != "json":
            assert "\\xe9" in out or "\\u732b" in out, (name, out)
        if name != "config":
            assert "bad \\xe9.png" in err, (name, err)
