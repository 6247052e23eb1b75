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


@pytest.mark.vllm
def test_dead_engine_gives_503_and_the_server_exits_nonzero(tmp_path):
    """`kill -9` of the policy EngineCore under a request: the request gets a 503, /health
    turns 503, and `vgs serve` (run from a folder outside the repo, as a user would) exits
    non-zero, so a supervisor restarts it (vLLM's server does the same)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx
    import psutil

    from benchmarks.demo_world import POLICY_DIR

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vgs.cli", "serve", "--policy", str(POLICY_DIR), "--port",
                             str(port), "--kv-cache-gib", "0.25"], cwd=tmp_path, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        assert httpx.get(url + "/health").status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        cores = [p for p in psutil.Process(proc.pid).children(recursive=True) if "EngineCore" in " ".join(
            [p.name()] + p.cmdline())]
        assert len(cores) == 1, cores
        out = {}

        def long_request():
            out["r"] = httpx.post(url + "/v1/completions", json={"prompt": "1 +2", "max_tokens": 200, "n": 64,
                                                                 "temperature": 1.0}, timeout=60)

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.3)
        os.kill(cores[0].pid, signal.SIGKILL)
        t.join()
        assert out["r"].status_code == 503, out["r"].text
        assert out["r"].json()["error"]["code"] == "engine_dead"
        try:
            health = httpx.get(url + "/health", timeout=5).status_code
        except httpx.TransportError:
            health = None  # already gone
        assert health in (503, None)
        assert proc.wait(timeout=120) != 0
        assert "engine process died" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
