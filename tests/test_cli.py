"""The command line as a person at a terminal meets it: progress bars in a terminal, none under -q or into a pipe."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_terminal(argv: list[str], timeout: float = 120) -> tuple[int, str]:
    """(exit code, everything written) of `darwin ARGV` with a pseudo-terminal as stdin, stdout and stderr."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a fresh pty is 0 columns wide
    env = {k: v for k, v in os.environ.items() if k != "DARWIN_QUIET"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *argv], stdin=slave, stdout=slave, stderr=slave,
                            cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode(errors="replace")


def test_a_merge_shows_its_progress_in_a_terminal_and_not_under_quiet_or_into_a_pipe(pico_checkpoint, tmp_path):
    genome = tmp_path / "genome.json"
    genome.write_text(json.dumps({"global_ratio": 0.5, "attn_ratio": 0.5, "ffn_ratio": 0.5, "embed_ratio": 0.5,
                                  "density_a": 0.9, "density_b": 0.9}))
    argv = ["merge", "--father", str(pico_checkpoint("llama", perturb=1)), "--mother",
            str(pico_checkpoint("llama", perturb=2)), "--genome", str(genome), "--method", "darwin-v5"]
    code, shown = run_in_terminal([*argv, "--out", str(tmp_path / "shown")])
    assert code == 0 and "merge:" in shown and "%|" in shown  # tqdm's bar: "merge:  40%|████      | ..."
    for variant, command in (("quiet", ["-q", *argv]), ("option", [*argv, "--quiet"])):
        code, quiet = run_in_terminal([*command, "--out", str(tmp_path / variant)])
        assert code == 0 and "%|" not in quiet and str(tmp_path / variant) in quiet  # the result line stays
    piped = subprocess.run([sys.executable, "-m", "flows.cli", *argv, "--out", str(tmp_path / "piped")], cwd=ROOT,
                           capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                if k != "DARWIN_QUIET"})
    assert piped.returncode == 0 and "%|" not in piped.stderr + piped.stdout


def test_quiet_and_verbose_exclude_each_other_and_a_command_is_required(capsys):
    import pytest

    from flows.cli import main

    for argv, said in ((["-q"], "a COMMAND is required"), (["-q", "-v", "merge"], "not allowed with")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and said in capsys.readouterr().err
