"""Start the real API server in a subprocess for the app tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "test-key-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, index: Path, api_key: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RAG_INDEX_DIR": str(index), "RAG_INGEST_ROOTS": f'["{root / "docs"}"]'}
    env.pop("RAG_API_KEY", None)
    if api_key:
        env["RAG_API_KEY"] = api_key
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.api:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/health")
    return proc, url


def wait_healthy(proc: subprocess.Popen, health_url: str, timeout: float = 60.0) -> None:
    """Poll `health_url` until it answers 200; kill `proc` and fail if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            raise RuntimeError(f"server exited: {err}")
        try:
            if httpx.get(health_url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not answer {health_url} within {timeout:.0f} s")
