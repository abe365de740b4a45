"""`rag bench scaling`: final loss of several model sizes trained on the same tokens, and a power-law fit.

Kaplan et al. (2020) found that loss falls as a power of the non-embedding parameter count N,
L(N) = a * N^-alpha + c, when data is not the bottleneck. Here every size sees the same tokens
(same corpus, same order, same count), so the larger models are under-trained and the fitted
floor c also absorbs the limited data; the point is the measurement pipeline, small enough for a
shared CPU in about ten minutes. The small-run helpers here are shared with `bench.llm`'s
length-extrapolation table.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

BENCH_CORPUS = "wikitext-2"
BENCH_VOCAB = 1024  # small: the output layer would otherwise dominate the tiny models' compute

# (n_layer, d_model, n_head): 33K to 1.3M non-embedding parameters.
SCALING_SIZES: tuple[tuple[int, int, int], ...] = (
    (2, 32, 2),
    (2, 64, 4),
    (3, 96, 4),
    (4, 128, 4),
    (4, 160, 4),
)


@dataclass
class SmallRun:
    """Hyper-parameters shared by every small benchmark run (only the model differs between runs)."""

    block_size: int = 128
    tokens: int = 600_000
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    eval_iters: int = 20
    seed: int = 1337


def bench_data(corpus: str = BENCH_CORPUS, vocab_size: int = BENCH_VOCAB) -> Path:
    """Token files for `corpus` with a small BPE trained on it, made once under .data/ (as `rag train lm`)."""
    from rag.llm.cli import ensure_data

    return ensure_data(corpus, vocab_size, prepare=True)


def train_small(data_dir: Path, overrides: dict, run: SmallRun, out_dir: Path) -> float:
    """Train one model (the tiny preset with `overrides`) on run.tokens tokens; returns its val loss.

    The schedule and the sampled windows depend only on `run`, so runs differ only in the model.
    """
    from rag.llm.train import TrainConfig, train_lm

    cfg = TrainConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        model="tiny",
        model_overrides={"block_size": run.block_size, **overrides},
        batch_size=run.batch_size,
        lr=run.lr,
        min_lr=run.lr / 10,
        warmup_steps=run.warmup_steps,
        max_tokens=run.tokens,
        eval_interval=10**9,  # evaluate once, at the end
        eval_iters=run.eval_iters,
        log_interval=10**9,
        seed=run.seed,
        device="cpu",
    )
    with contextlib.redirect_stdout(sys.stderr):  # the loop prints eval lines; stdout is for --json
        return float(train_lm(cfg).val_loss)


def size_overrides(n_layer: int, d_model: int, n_head: int) -> dict:
    return {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "n_kv_head": n_head}


def non_embedding_params(overrides: dict, vocab_size: int = BENCH_VOCAB) -> int:
    from rag.llm.model import GPT, ModelConfig

    cfg = ModelConfig.from_dict(
        {**ModelConfig.preset("tiny").to_dict(), **overrides, "vocab_size": vocab_size}
    )
    return GPT(cfg).num_params(non_embedding=True)


@dataclass
class PowerLaw:
    """loss = a * N^-alpha + c."""

    a: float
    alpha: float
    c: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray | float:
        return self.a * np.power(n, -self.alpha) + self.c

    def __str__(self) -> str:
        return f"loss = {self.a:.4g} * N^-{self.alpha:.4f} + {self.c:.4f}"


def fit_power_law(n: list[float], loss: list[float]) -> PowerLaw:
    """Least-squares fit of loss = a * N^-alpha + c (scipy curve_fit), with 0 <= c <= min(loss).

    N is divided by its smallest value during the fit, so a is O(loss) and the problem is well scaled.
    """
    from scipy.optimize import curve_fit

    if len(n) != len(loss) or len(n) < 3:
        raise ValueError(f"a 3-parameter fit needs at least 3 (N, loss) points, got {len(n)}")
    n_arr, y = np.asarray(n, dtype=float), np.asarray(loss, dtype=float)
    n0 = n_arr.min()

    def f(x, a, alpha, c):
        return a * np.power(x, -alpha) + c

    lo = y.min()
    p0 = (max(y.max() - 0.9 * lo, 1e-3), 0.3, 0.9 * lo)
    (a, alpha, c), _ = curve_fit(
        f, n_arr / n0, y, p0=p0, bounds=([0.0, 0.0, 0.0], [np.inf, 5.0, lo]), maxfev=20000
    )
    return PowerLaw(a=float(a * n0**alpha), alpha=float(alpha), c=float(c))


def plot_scaling(n: list[int], loss: list[float], fit: PowerLaw, path: Path, title: str) -> None:
    """Points and the fitted curve, log-scale N (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    grid = np.geomspace(min(n) / 1.5, max(n) * 1.5, 200)
    ax.plot(n, loss, "o", label="val loss (measured)")
    ax.plot(grid, fit(grid), "-", label=str(fit))
    ax.axhline(fit.c, color="gray", ls=":", lw=1, label=f"floor c = {fit.c:.3f}")
    ax.set_xscale("log")
    ax.set(xlabel="non-embedding parameters N", ylabel="val loss (nats/token)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_scaling(
    plot_path: str | Path,
    tokens: int = 600_000,
    sizes: tuple[tuple[int, int, int], ...] = SCALING_SIZES,
    corpus: str = BENCH_CORPUS,
    progress: Callable[[str], None] = print,
) -> dict:
    """Train every size on the same tokens, fit the power law, save the plot; returns a JSON-able dict."""
    run, plot_path = SmallRun(tokens=tokens), Path(plot_path)
    if len(sizes) < 3:
        raise ValueError(f"the fit needs at least 3 model sizes, got {len(sizes)}")
    data_dir = bench_data(corpus)
    points = []
    with tempfile.TemporaryDirectory(prefix="rag-scaling-") as tmp:
        for i, size in enumerate(sizes):
            overrides = size_overrides(*size)
            progress(f"size {i + 1}/{len(sizes)}: {overrides} on {tokens:,} tokens ...")
            loss = train_small(data_dir, overrides, run, Path(tmp) / f"size{i}")
            points.append(
                {
                    "n_layer": size[0],
                    "d_model": size[1],
                    "n_head": size[2],
                    "params": non_embedding_params(overrides),
                    "val_loss": loss,
                }
            )
    n = [p["params"] for p in points]
    losses = [p["val_loss"] for p in points]
    fit = fit_power_law(n, losses)
    plot_scaling(n, losses, fit, plot_path, f"{corpus}, {run.tokens:,} tokens per model")
    residual = math.sqrt(float(np.mean((fit(np.asarray(n, dtype=float)) - np.asarray(losses)) ** 2)))
    return {
        "corpus": corpus,
        "run": asdict(run),
        "points": points,
        "fit": {**asdict(fit), "rmse": residual, "formula": str(fit)},
        "plot": str(plot_path),
    }
