"""`vgs serve` argument errors: one line, exit 2, before any engine starts."""

from __future__ import annotations

import pytest

from vgs.cli import main


@pytest.mark.parametrize("extra, message", [
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--max-budget", "0"], "--max-budget must be >= 1"),
    (["--max-sequences", "0"], "--max-sequences must be >= 1"),
    (["--request-timeout", "-1"], "--request-timeout must be > 0"),
    (["--value-backend", "onnx"], "--value-backend must be vllm or hf"),
    (["--value-model", "/nonexistent/vm"], "does not exist"),
])
def test_serve_bad_arguments_exit_2_with_one_line(extra, message, tiny_policy, capsys):
    code = main(["serve", "--policy", tiny_policy] + extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_serve_missing_policy(capsys):
    assert main(["serve", "--policy", "/nonexistent/policy"]) == 2
    assert "does not exist" in capsys.readouterr().err
