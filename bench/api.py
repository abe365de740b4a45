"""Load on a real API server (`rag serve` on 127.0.0.1, in its own process): many clients
searching, then searching while others ask for answers.

Bounded phases, each a fixed number of requests per client: one client's searches (the
baseline), `search_clients` x `searches` searches at once, then `answer_clients` x `answers`
answers (POST /v1/ask) twice: while one client searches, and while the `search_clients` search
again. Reported per phase: errors (goal 0), p50/p95 latency, throughput; and the server's peak
RSS over the run. One client's searches during answers are compared with its p95 alone (goal:
under 4x): answers generating must not starve search. The many clients' searches during answers
are reported against both baselines: on 2 cores, 16 clients queue behind each other even with
no answer running.

The index holds real texts (Gutenberg passages) with random unit vectors (bench/search.py), so
it builds in seconds; queries are SQuAD dev questions, embedded for real by the server. The
reader is RAG_MODEL_DIR's (or --model); without one the answers are the search fallback, and the
result says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.data import BENCH_DIR, squad_questions
from bench.search import build_index
from rag.config import Settings

READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 600.0  # an answer may wait for every other answer in the queue


class Load:
    """The outcome of one kind of request in one phase: latencies of successes, error count."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self.start = time.perf_counter()
        self.end = self.start

    def record(self, ms: float | None, error: str = "") -> None:
        with self._lock:
            if error:
                self.errors.append(error)
            else:
                self.ms.append(ms or 0.0)
            self.end = time.perf_counter()

    def summary(self) -> dict:
        wall = max(self.end - self.start, 1e-9)
        p50, p95 = np.percentile(self.ms, [50, 95]) if self.ms else (float("nan"), float("nan"))
        return {
            "requests": len(self.ms) + len(self.errors),
            "errors": len(self.errors),
            "first_error": self.errors[0] if self.errors else "",
            "p50_ms": float(p50),
            "p95_ms": float(p95),
            "per_s": len(self.ms) / wall,
        }


def client_loop(
    url: str, path: str, bodies: list[dict], load: Load, stop: threading.Event | None = None
) -> None:
    """One client: its requests one after the other (after the first, until `stop` if given);
    non-200 is an error."""
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for i, body in enumerate(bodies):
            if i and stop is not None and stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                r = client.post(path, json=body)
            except httpx.HTTPError as exc:
                load.record(None, f"{type(exc).__name__}: {exc}")
                continue
            ms = (time.perf_counter() - t0) * 1e3
            load.record(ms, "" if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}")


def run_clients(jobs: list[Callable[[], None]]) -> None:
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


class PeakRss:
    """Samples a process's resident memory (with its children) every 50 ms in a thread."""

    def __init__(self, pid: int):
        self.proc, self.peak = psutil.Process(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def start_server(index: Path, model: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "RAG_MODEL_DIR": str(model), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "rag.cli", "serve", "--port", str(port), "--index", str(index)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the server exited: {proc.stderr.read().decode()[-1000:] if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer within {READY_TIMEOUT_S:.0f} s")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    index: Path | None = None,
    model: Path | None = None,
    chunks: int = 10_000,
    search_clients: int = 16,
    searches: int = 100,
    answer_clients: int = 4,
    answers: int = 10,
    k: int = 5,
    progress: Callable[[str], object] = print,
) -> dict:
    settings = Settings()
    if index is None:
        index = BENCH_DIR / "api" / f"index-{chunks}"
        build_index(index, chunks, 120, settings.embedding_model, 384)
    elif not (index / "meta.sqlite").is_file():
        raise FileNotFoundError(f"no index at {index.absolute()} (run `rag ingest` first)")
    model = model or settings.model_dir
    questions = squad_questions(max(searches, answers) + 20)
    search_bodies = [{"query": q, "k": k} for q in questions[20 : 20 + searches]]
    answer_bodies = [{"question": q, "k": k} for q in questions[20 : 20 + answers]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(index, model, port)
    try:
        wait_ready(proc, url)
        rss = PeakRss(proc.pid)
        progress("warming up: the embedder and the reader load on first use")
        warm = Load()
        client_loop(url, "/v1/search", search_bodies[:5], warm)
        client_loop(url, "/v1/ask", answer_bodies[:1], warm)
        if warm.errors:
            raise RuntimeError(f"the server failed a warm-up request: {warm.errors[0]}")
        reader = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["rag"]
        n_chunks = httpx.get(f"{url}/v1/stats", timeout=30).json()["chunks"]

        progress(f"1 client x {searches} searches")
        single = Load()
        client_loop(url, "/v1/search", search_bodies, single)

        progress(f"{search_clients} clients x {searches} searches")
        many = Load()
        run_clients([lambda: client_loop(url, "/v1/search", search_bodies, many)] * search_clients)

        def answers_while_searching(searchers: int) -> tuple[Load, Load]:
            """The answer phase with `searchers` clients searching until the answers are done."""
            progress(f"{answer_clients} clients x {answers} answers, {searchers} searching meanwhile")
            asked, during, done = Load(), Load(), threading.Event()

            def answering() -> None:
                run_clients([lambda: client_loop(url, "/v1/ask", answer_bodies, asked)] * answer_clients)
                done.set()

            rounds = search_bodies * 10  # searchers go round their questions (at most 10 rounds)
            searching = [lambda: client_loop(url, "/v1/search", rounds, during, done)] * searchers
            run_clients([answering, *searching])
            return asked, during

        asked_1, during_1 = answers_while_searching(1)
        asked, during = answers_while_searching(search_clients)
        peak = rss.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    p95 = {
        name: load.summary()["p95_ms"]
        for name, load in [("single", single), ("many", many), ("during_1", during_1), ("during", during)]
    }
    return {
        "server": f"rag serve on 127.0.0.1 (a process of its own), index of {n_chunks} chunks",
        "reader": "none: answers are the search fallback" if not reader["available"] else reader["model_dir"],
        "cpus": os.cpu_count(),
        "phases": [
            {"phase": "1 client searching", **single.summary()},
            {"phase": f"{search_clients} clients searching", **many.summary()},
            {"phase": f"{answer_clients} clients asking, 1 searching", **asked_1.summary()},
            {"phase": "1 client searching during answers", **during_1.summary()},
            {"phase": f"{answer_clients} clients asking, {search_clients} searching", **asked.summary()},
            {"phase": f"{search_clients} clients searching during answers", **during.summary()},
        ],
        "peak_server_rss_mb": peak / 2**20,
        # the goal: a search while answers generate, against the same client alone
        "search_p95_during_answers_over_single_p95": p95["during_1"] / p95["single"],
        # the same with many searchers: their own queueing on the cores is in both terms
        "many_search_p95_during_answers_over_many_p95": p95["during"] / p95["many"],
        "many_search_p95_during_answers_over_single_p95": p95["during"] / p95["single"],
        "goal_search_p95_ratio": 4.0,
    }
