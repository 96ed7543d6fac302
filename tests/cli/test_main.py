"""The ``hf-optim`` entry point in a real subprocess: ``--version``, a closed stdout pipe, logging configuration."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import hf_optim

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hf-optim")
# The entry point as a module, run under a root logger configured at INFO: what an application that calls
# logging.basicConfig(INFO) and then hf_optim's CLI sees.
UNDER_BASIC_CONFIG = (
    "import logging, sys; logging.basicConfig(level=logging.INFO); "
    "from hf_optim.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *argv], capture_output=True, text=True, timeout=300, **kwargs)


def test_version():
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hf-optim {hf_optim.__version__}"


def test_version_does_not_import_torch():
    """The console script's module (hf_optim/_console.py, installed outside the package) answers ``--version``
    from the package metadata, importing neither torch nor hf_optim."""
    code = (
        "import importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('_console', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "code = module.main(['--version']); "
        "print(sorted(m for m in ('torch', 'hf_optim') if m in sys.modules)); sys.exit(code)"
    )
    console = os.path.join(os.path.dirname(hf_optim.__file__), "_console.py")
    result = subprocess.run(
        [sys.executable, "-c", code, console], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"hf-optim {hf_optim.__version__}", "[]"]


def test_parsing_and_help_import_no_torch():
    """Every sub-command's parser is built, and its ``--help`` printed, without importing torch: the commands import
    the library only when they run."""
    code = (
        "import contextlib, io, sys\n"
        "from hf_optim.cli.main import build_parser, main\n"
        "commands = sorted(build_parser()._subparsers._group_actions[0].choices)\n"
        "for argv in [['--help']] + [[name, '--help'] for name in commands]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(*commands, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["consolidate", "convert", "hub", "inspect", "list", "plot", "False"]


def test_closed_stdout_pipe_ends_quietly():
    # 50 000 lines (~500 kB), far more than a pipe buffer holds: the writer is still writing when the reader leaves.
    process = subprocess.Popen(
        [SCRIPT, "plot", "linear", "--num-training-steps", "10", "--height", "50000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline()
    process.stdout.close()  # like `| head -1`
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=300) == 1  # Python's own exit status for EPIPE
    assert stderr == ""  # no "error: [Errno 32] Broken pipe", no traceback


def test_no_http_request_lines_in_cli_output(hub_repo_id, tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = hf_optim.create_optimizer("adamw_hf", model, lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    hf_optim.push_state_to_hub(hub_repo_id, optimizer)
    url = f"hf://{hub_repo_id}"

    result = run("inspect", url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "adamw_hf" in result.stdout
    assert "HTTP" not in result.stdout + result.stderr

    # The reference: the same command where the root logger is configured at INFO does print them.
    configured = subprocess.run(
        [sys.executable, "-c", UNDER_BASIC_CONFIG, "inspect", url],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert configured.returncode == 0, configured.stderr
    assert "HTTP Request" in configured.stderr


def test_printable_escapes_terminal_control_characters():
    from hf_optim.cli import printable

    assert printable("plain text: é, 名前") == "plain text: é, 名前"
    assert printable("a\x1b]52;c;Zg==\x07b") == "a\\x1b]52;c;Zg==\\x07b"
    assert printable("x\u202ey\rz\n") == "x\\u202ey\\rz\n"
