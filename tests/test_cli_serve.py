"""`rag serve --ui` as a real process: the API and the web UI on this machine only, long URLs cut
in the access log, a second server on the same port refused in one line, Ctrl-C stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.app.servers import free_port, listening_on, wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def rag_serve(*args: object, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "rag.cli", "serve", *map(str, args)],
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "80"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_serve_with_ui(tmp_path):
    api_port, ui_port = free_port(), free_port()
    api = f"http://127.0.0.1:{api_port}"
    proc = rag_serve(
        "--port", api_port, "--index", tmp_path / "index", "--ui", "--ui-port", ui_port, log=tmp_path / "log"
    )
    try:
        wait_healthy(proc, f"{api}/v1/health", timeout=120)
        assert httpx.get(f"{api}/v1/health", timeout=30).json()["index"] == str(tmp_path / "index")
        wait_healthy(proc, f"http://127.0.0.1:{ui_port}/_stcore/health", timeout=120)
        assert listening_on(api_port) == listening_on(ui_port) == {"127.0.0.1"}

        long = "x" * 5000
        assert httpx.get(f"{api}/v1/documents?q={long}", timeout=30).status_code == 503  # no index yet
        second = ["serve", "--port", str(api_port), "--ui", "--ui-port", str(free_port())]
        again = subprocess.run(
            [sys.executable, "-m", "rag.cli", *second], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert again.returncode == 1 and again.stdout == "" and again.stderr.count("\n") == 1
        assert f"port {api_port} on 127.0.0.1 is already in use" in again.stderr

        ui = next(c for c in psutil.Process(proc.pid).children() if "streamlit" in " ".join(c.cmdline()))
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(60)
        assert not ui.is_running() or ui.wait(30) is not None
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert "Traceback" not in log and "Network URL" not in log and "Deploy" not in log
    assert (
        f"GET /v1/documents?q={'x' * 150}" in log
        and f"…(+{len('/v1/documents?q=') + 5000 - 200} chars)" in log
    )
    assert long not in log
    deadline = time.monotonic() + 30
    while listening_on(ui_port) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not listening_on(ui_port)
