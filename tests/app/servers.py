"""Start the real API server and web UI in subprocesses, and a headless Chromium, for the app tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from playwright.sync_api import Page

KEY = "test-key-123"
ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")  # Debian's package


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(
    root: Path, index: Path, api_key: str | None, model_dir: Path | None = None, **env: str
) -> dict:
    """The environment of a test server: its index, `root`/docs as ingest root, the reader checkpoint
    `model_dir` (default: one that is not there), `api_key` or none, then any RAG_* in `env`."""
    out = {**os.environ, "RAG_INDEX_DIR": str(index), "RAG_INGEST_ROOTS": f'["{root / "docs"}"]'}
    out["RAG_MODEL_DIR"] = str(model_dir or root / "no-reader-model")
    out.pop("RAG_API_KEY", None)
    if api_key:
        out["RAG_API_KEY"] = api_key
    return {**out, **env}


def start_server(
    root: Path, index: Path, api_key: str | None, model_dir: Path | None = None, **env: str
) -> tuple[subprocess.Popen, str]:
    """The API (as uvicorn runs it) on a free port, set up by server_env."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app.api:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        env=server_env(root, index, api_key, model_dir, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/v1/health")
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


def warm_up(url: str, path: str = "/v1/search", body: dict | None = None) -> None:
    """One request that loads what the server loads on first use (the embedder, the reader): on a
    2-core machine shared with a training run that takes minutes, which no test's timeout is about."""
    r = httpx.post(f"{url}{path}", json=body or {"query": "warm up"}, timeout=600)
    assert r.status_code == 200, r.text


def listening_on(port: int) -> set[str]:
    """The addresses a TCP port is listened on, by any process of this machine."""
    import psutil

    return {
        c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"
    }


def stop(proc: subprocess.Popen) -> None:
    """Terminate; kill if it has not exited within 30 s (a loaded 2-core machine exits slowly)."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@contextmanager
def api_server(
    root: Path, index: Path, api_key: str | None = None, model_dir: Path | None = None, **env: str
) -> Iterator[str]:
    """A running API (see start_server); yields its URL, stops it after."""
    proc, url = start_server(root, index, api_key, model_dir, **env)
    try:
        yield url
    finally:
        stop(proc)


@contextmanager
def ui_server(
    root: Path,
    index: Path,
    api_key: str | None = None,
    model_dir: Path | None = None,
    address: str | None = None,
) -> Iterator[str]:
    """A running API and the web UI talking to it; yields the UI's URL, stops both after."""
    with api_server(root, index, api_key, model_dir) as api_url:
        warm_up(api_url)
        proc, url = start_ui(api_url, address)
        try:
            yield url
        finally:
            stop(proc)


def start_ui(api_url: str, address: str | None = None) -> tuple[subprocess.Popen, str]:
    """`streamlit run app/ui.py` from the project folder (its .streamlit/config.toml applies) on a
    free port, talking to the API at `api_url`; `address`: where to listen instead of the default."""
    port = free_port()
    where = ["--server.address", address] if address else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/ui.py", "--server.port", str(port), *where],
        cwd=ROOT,
        env={**os.environ, "RAG_API_URL": api_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, f"{url}/_stcore/health")
    return proc, url


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A page in a real headless Chromium (CHROMIUM must be set)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],  # fmt: skip
        )
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 900})
        finally:
            browser.close()
