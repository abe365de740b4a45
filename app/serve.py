"""`rag serve`: the REST API under uvicorn and, with `--ui`, the web UI, from one command.

The API's socket is bound before anything else loads, so a port in use is one clear line and
nothing starts. The web UI starts only once the API on that socket is up, so it never talks to
another program's server; when either stops, both stop.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from rag.config import Settings

UI_SCRIPT = Path(__file__).with_name("ui.py")
# The UI's Streamlit options besides address and port (also in .streamlit/config.toml, for a bare
# `streamlit run app/ui.py`): no browser to open, no usage statistics, no Deploy button or dev menu.
UI_OPTIONS = {"server.headless": "true", "browser.gatherUsageStats": "false", "client.toolbarMode": "minimal"}
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

log = logging.getLogger("uvicorn.error")  # printed as uvicorn prints its own lines


class CannotListen(OSError):
    """The address cannot be listened on (port in use, unknown host); the message says which."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), not yet listening."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restarts need no wait
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"port {port} on {host} is already in use (another server?): stop it or choose another port"
            ) from None
        raise CannotListen(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def ui_command(host: str, port: int) -> list[str]:
    options = {"server.address": host, "server.port": str(port), **UI_OPTIONS}
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(UI_SCRIPT),
        *(f"--{k}={v}" for k, v in options.items()),
    ]


def serve(
    settings: Settings, host: str, port: int, ui: tuple[str, int] | None = None, graceful_s: int = 5
) -> None:
    """Serve the API on host:port until Ctrl-C; with `ui` = (host, port), the web UI as well.

    Raises CannotListen before anything starts when an address is taken. Open answer streams are
    stopped `graceful_s` seconds into a shutdown rather than every queued answer finishing.
    """
    api_socket = bind(host, port)
    if ui is not None:
        bind(*ui).close()  # taken: fail now, not after the API started
    import uvicorn

    from app.api import create_app

    port = api_socket.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings), host=host, port=port, timeout_graceful_shutdown=graceful_s, log_level="info"
    )
    server = uvicorn.Server(config)
    ui_runner = UiRunner(server, ui, url(host, port)) if ui is not None else None
    log.info("API on %s (docs at /docs), index %s; Ctrl-C stops", url(host, port), settings.index_dir)
    try:
        server.run(sockets=[api_socket])
    finally:
        if ui_runner is not None:
            ui_runner.stop()
    if ui_runner is not None and ui_runner.failed:
        raise CannotListen(f"the web UI stopped: {ui_runner.failed}")


class UiRunner:
    """Starts the web UI once `server` is up, pointed at `api_url`; stops the server if the UI
    exits on its own, and the UI when the server stops."""

    def __init__(self, server, ui: tuple[str, int], api_url: str):
        self.server, self.ui, self.api_url = server, ui, api_url
        self.proc: subprocess.Popen | None = None
        self.failed = ""
        self._lock = threading.Lock()
        self._stopping = False
        threading.Thread(target=self._run, name="rag-ui", daemon=True).start()

    def _run(self) -> None:
        while not self.server.started:
            if self.server.should_exit:
                return
            time.sleep(0.1)
        with self._lock:
            if self._stopping:
                return
            env = {**os.environ, "RAG_API_URL": self.api_url}
            self.proc = subprocess.Popen(ui_command(*self.ui), env=env)
        log.info("web UI on %s", url(*self.ui))
        code = self.proc.wait()
        with self._lock:
            if not (self._stopping or self.server.should_exit):  # the UI ended alone: so does the API
                self.failed = f"exit code {code}"
                self.server.should_exit = True

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
