"""`rag bench scaling`: final loss of several model sizes trained on the same tokens, and a power-law fit;
`rag bench scaling --data`: a grid over model size and tokens, and the Chinchilla law L(N, D).

Kaplan et al. (2020) found that loss falls as a power of the non-embedding parameter count N,
L(N) = a * N^-alpha + c, when data is not the bottleneck. Here every size sees the same tokens
(same corpus, same order, same count), so the larger models are under-trained and the fitted
floor c also absorbs the limited data; the point is the measurement pipeline, small enough for a
shared CPU in about ten minutes. The small-run helpers here are shared with `bench.llm`'s
length-extrapolation table.

Hoffmann et al. (2022, "Chinchilla") vary the tokens D as well and fit
L(N, D) = E + A / N^alpha + B / D^beta; minimising it at fixed compute C = 6ND gives the
compute-optimal N_opt(C) and D_opt(C), and their ratio, about 20 tokens per parameter in the paper.
`run_data_scaling` does this on a grid small enough for a CPU; what it fits holds on that grid only.
"""

from __future__ import annotations

import contextlib
import math
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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

# `--data`: the first four sizes, each trained on every token budget (at most 0.4 epoch of
# WikiText-2's 4.2M train tokens). 100K (49 steps) was tried and left out: such short runs miss
# the Chinchilla form by up to 0.36 nats (docs/benchmarks.md).
DATA_SIZES = SCALING_SIZES[:4]
DATA_TOKENS: tuple[int, ...] = (200_000, 400_000, 800_000, 1_600_000)
CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, compute-optimal ratio (about)


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


def param_count(overrides: dict, vocab_size: int = BENCH_VOCAB, non_embedding: bool = True) -> int:
    """Parameters of the tiny preset with `overrides`; with non_embedding=False the (tied) token table
    counts too, as it does in the 6N training FLOPs per token (it is also the output layer)."""
    from rag.llm.model import GPT, ModelConfig

    cfg = ModelConfig.from_dict(
        {**ModelConfig.preset("tiny").to_dict(), **overrides, "vocab_size": vocab_size}
    )
    return GPT(cfg).num_params(non_embedding=non_embedding)


def train_points(
    data_dir: Path, grid: list[tuple[tuple[int, int, int], SmallRun]], progress: Callable[[str], None]
) -> list[dict]:
    """Train each (size, run) of `grid` in a temporary folder; one row per run."""
    from rag.llm.data import read_meta

    vocab, points = read_meta(data_dir)["vocab_size"], []
    with tempfile.TemporaryDirectory(prefix="rag-scaling-") as tmp:
        for i, (size, run) in enumerate(grid):
            overrides = size_overrides(*size)
            progress(f"run {i + 1}/{len(grid)}: {overrides} on {run.tokens:,} tokens ...")
            loss = train_small(data_dir, overrides, run, Path(tmp) / f"run{i}")
            points.append(
                {
                    "n_layer": size[0],
                    "d_model": size[1],
                    "n_head": size[2],
                    "params": param_count(overrides, vocab),
                    "total_params": param_count(overrides, vocab, non_embedding=False),
                    "tokens": run.tokens,
                    "val_loss": loss,
                }
            )
    return points


def rmse(predicted: np.ndarray, measured: list[float]) -> float:
    return math.sqrt(float(np.mean((predicted - np.asarray(measured, dtype=float)) ** 2)))


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


def _axes(size: tuple[float, float]):
    """A figure and axes on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=100)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def plot_scaling(n: list[int], loss: list[float], fit: PowerLaw, path: Path, title: str) -> None:
    """Points and the fitted curve, log-scale N."""
    fig, ax = _axes((6.5, 4.2))
    grid = np.geomspace(min(n) / 1.5, max(n) * 1.5, 200)
    ax.plot(n, loss, "o", label="val loss (measured)")
    ax.plot(grid, fit(grid), "-", label=str(fit))
    ax.axhline(fit.c, color="gray", ls=":", lw=1, label=f"floor c = {fit.c:.3f}")
    ax.set_xscale("log")
    ax.set(xlabel="non-embedding parameters N", ylabel="val loss (nats/token)", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


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
    points = train_points(bench_data(corpus), [(size, run) for size in sizes], progress)
    n = [p["params"] for p in points]
    losses = [p["val_loss"] for p in points]
    fit = fit_power_law(n, losses)
    plot_scaling(n, losses, fit, plot_path, f"{corpus}, {run.tokens:,} tokens per model")
    residual = rmse(fit(np.asarray(n, dtype=float)), losses)
    return {
        "corpus": corpus,
        "run": asdict(run),
        "points": points,
        "fit": {**asdict(fit), "rmse": residual, "formula": str(fit)},
        "plot": str(plot_path),
    }


# ---- `--data`: L(N, D) over a grid of sizes and token budgets (Chinchilla form) -----------------


@dataclass
class DataLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022); N parameters, D training tokens."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float

    def __call__(self, n, d):
        return self.E + self.A * np.power(n, -self.alpha) + self.B * np.power(d, -self.beta)

    def optimal(self, compute):
        """(N_opt, D_opt) minimising L at C = 6ND: N_opt = G (C/6)^(beta/(alpha+beta)),
        G = (alpha A / (beta B))^(1/(alpha+beta)), and D_opt = C / (6 N_opt)."""
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * np.power(np.asarray(compute, dtype=float) / 6, self.beta / s)
        return n, np.asarray(compute, dtype=float) / (6 * n)

    def __str__(self) -> str:
        return f"L = {self.E:.4f} + {self.A:.4g} / N^{self.alpha:.4f} + {self.B:.4g} / D^{self.beta:.4f}"


def _huber_objective(p: np.ndarray, log_n, log_d, log_l, delta: float):
    """Hoffmann et al.'s objective and its gradient: sum of Huber(LSE(a - alpha log N,
    b - beta log D, e) - log L) over the points, with A = e^a, B = e^b, E = e^e."""
    a, alpha, b, beta, e = p
    u = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = u.max(axis=0)
    lse = top + np.log(np.exp(u - top).sum(axis=0))
    r = lse - log_l
    w = np.exp(u - lse)  # softmax over the three terms: d lse / d u
    huber = np.where(np.abs(r) <= delta, 0.5 * r**2, delta * (np.abs(r) - 0.5 * delta))
    g = np.clip(r, -delta, delta)
    grad = np.array(
        [
            (g * w[0]).sum(),
            -(g * w[0] * log_n).sum(),
            (g * w[1]).sum(),
            -(g * w[1] * log_d).sum(),
            (g * w[2]).sum(),
        ]
    )
    return float(huber.sum()), grad


def fit_data_law(
    n: list[float], d: list[float], loss: list[float], delta: float = 1e-3, starts: int = 4
) -> DataLaw:
    """Fit L(N, D) as Hoffmann et al. (2022) do: L-BFGS on the Huber loss (delta 1e-3) of log L.

    Starting points: a grid over alpha, beta and E (as a share of the lowest loss), with A and B
    by non-negative least squares for each; the `starts` best of those are refined, the best wins.
    N and D are divided by their geometric means during the fit (a and alpha, b and beta would
    otherwise be almost collinear), and A and B scaled back afterwards.
    """
    from scipy.optimize import minimize, nnls

    if not len(n) == len(d) == len(loss):
        raise ValueError("n, d and loss must have the same length")
    if len(n) < 5 or len(set(n)) < 2 or len(set(d)) < 2:
        raise ValueError(
            f"a 5-parameter fit needs at least 5 points over 2+ sizes and 2+ token counts, got {len(n)}"
        )
    y = np.asarray(loss, dtype=float)
    log_n, log_d, log_l = np.log(np.asarray(n, dtype=float)), np.log(np.asarray(d, dtype=float)), np.log(y)
    n0, d0 = log_n.mean(), log_d.mean()
    log_n, log_d = log_n - n0, log_d - d0
    n_arr, d_arr = np.exp(log_n), np.exp(log_d)
    inits = []
    for alpha in (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5):
        for beta in (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5):
            x = np.stack([n_arr**-alpha, d_arr**-beta], axis=1)
            for share in (0.0, 0.3, 0.6, 0.8, 0.9, 0.95):
                e = share * y.min()
                (big_a, big_b), _ = nnls(x, y - e)
                p = np.log([max(big_a, 1e-6), alpha, max(big_b, 1e-6), beta, max(e, 1e-3)])
                p[[1, 3]] = alpha, beta
                inits.append((_huber_objective(p, log_n, log_d, log_l, delta)[0], tuple(p)))
    best = None
    bounds = [(None, None), (1e-3, 3.0), (None, None), (1e-3, 3.0), (None, None)]
    for _, p0 in sorted(inits)[:starts]:
        res = minimize(
            _huber_objective,
            np.array(p0),
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=bounds,
            options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-12},
        )
        if best is None or res.fun < best.fun:
            best = res
    a, alpha, b, beta, e = best.x
    return DataLaw(
        E=math.exp(e),
        A=math.exp(a + alpha * n0),
        alpha=float(alpha),
        B=math.exp(b + beta * d0),
        beta=float(beta),
    )


def compute_frontier(law: DataLaw, n_range: tuple[float, float], d_range: tuple[float, float], k: int = 5):
    """N_opt, D_opt and tokens per parameter at k compute budgets spaced over the grid's 6ND range,
    each flagged by whether (N_opt, D_opt) lies inside the grid the law was fitted on."""
    compute = np.geomspace(6 * n_range[0] * d_range[0], 6 * n_range[1] * d_range[1], k)
    n_opt, d_opt = law.optimal(compute)
    return [
        {
            "compute": float(c),
            "n_opt": float(n),
            "d_opt": float(d),
            "tokens_per_param": float(d / n),
            "loss_opt": float(law(n, d)),
            "inside_grid": bool(n_range[0] <= n <= n_range[1] and d_range[0] <= d <= d_range[1]),
        }
        for c, n, d in zip(compute, n_opt, d_opt, strict=True)
    ]


def plot_data_scaling(points: list[dict], law: DataLaw, path: Path, corpus: str) -> None:
    """Contours of the fitted L over (N, D) a little past the grid (drawn as a dashed box), the
    measured points, iso-compute lines, the compute-optimal frontier and Chinchilla's D = 20 N."""
    n = np.array([p["total_params"] for p in points], dtype=float)
    d = np.array([p["tokens"] for p in points], dtype=float)
    (n_lo, n_hi), (d_lo, d_hi) = (n.min(), n.max()), (d.min(), d.max())
    in_grid = [
        r["tokens_per_param"]
        for r in compute_frontier(law, (n_lo, n_hi), (d_lo, d_hi), k=50)
        if r["inside_grid"]
    ]
    title = f"{corpus}, fitted on the dashed box: D_opt/N_opt " + (
        f"{min(in_grid):.3g}-{max(in_grid):.3g} inside it" if in_grid else "outside it everywhere"
    )
    ns, ds = np.geomspace(n_lo / 2, n_hi * 2, 120), np.geomspace(d_lo / 2, d_hi * 2, 120)
    grid_n, grid_d = np.meshgrid(ns, ds)
    fig, ax = _axes((7.0, 5.2))
    filled = ax.contourf(grid_n, grid_d, law(grid_n, grid_d), levels=14, cmap="viridis_r", alpha=0.85)
    fig.colorbar(filled, ax=ax, label="fitted val loss (nats/token)")
    ax.contour(grid_n, grid_d, law(grid_n, grid_d), levels=14, colors="k", linewidths=0.4, alpha=0.5)
    ax.scatter(n, d, c="white", edgecolors="k", zorder=3, label="trained (val loss)")
    for p in points:
        ax.annotate(
            f"{p['val_loss']:.2f}",
            (p["total_params"], p["tokens"]),
            fontsize=7,
            xytext=(4, 3),
            textcoords="offset points",
        )
    ax.plot(
        [n_lo, n_hi, n_hi, n_lo, n_lo],
        [d_lo, d_lo, d_hi, d_hi, d_lo],
        "m--",
        lw=1.5,
        label="fitted range (the grid)",
    )
    compute = np.geomspace(6 * ns[0] * ds[0], 6 * ns[-1] * ds[-1], 200)
    n_opt, d_opt = law.optimal(compute)
    inside = (n_lo <= n_opt) & (n_opt <= n_hi) & (d_lo <= d_opt) & (d_opt <= d_hi)
    ax.plot(n_opt, d_opt, "r:", lw=1.5, label="compute-optimal frontier, extrapolated")
    ax.plot(np.where(inside, n_opt, np.nan), d_opt, "r-", lw=2.5, label="compute-optimal, inside the grid")
    chinchilla = CHINCHILLA_TOKENS_PER_PARAM * ns
    seen = bool(((chinchilla >= ds[0]) & (chinchilla <= ds[-1])).any())
    ax.plot(
        ns, chinchilla, "k:", lw=1.2, label="Chinchilla D = 20 N" + ("" if seen else " (above this plot)")
    )
    for c in np.geomspace(6 * n_lo * d_lo, 6 * n_hi * d_hi, 5):
        ax.plot(ns, c / (6 * ns), color="gray", lw=0.6, ls="-.")
    ax.set(xscale="log", yscale="log", xlim=(ns[0], ns[-1]), ylim=(ds[0], ds[-1]))
    ax.set(xlabel="parameters N (incl. tied embedding)", ylabel="training tokens D")
    ax.set_title(f"{title} (Chinchilla ~20)", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)  # below: no point hidden
    _save(fig, path)


def run_data_scaling(
    plot_path: str | Path,
    budgets: tuple[int, ...] = DATA_TOKENS,
    sizes: tuple[tuple[int, int, int], ...] = DATA_SIZES,
    corpus: str = BENCH_CORPUS,
    progress: Callable[[str], None] = print,
    base: SmallRun | None = None,
    data_dir: Path | None = None,
) -> dict:
    """Train every size on every token budget (warmup 10% of steps, cosine to the run's end), fit
    L(N, D), plot it; returns a JSON-able dict that states the grid the fit holds on."""
    base, plot_path = base or SmallRun(), Path(plot_path)
    if len(sizes) < 2 or len(budgets) < 2 or len(sizes) * len(budgets) < 5:
        raise ValueError(
            f"the L(N, D) fit needs 2+ sizes, 2+ token budgets and 5+ runs, got {len(sizes)} x {len(budgets)}"
        )
    if min(budgets) < 1:
        raise ValueError(f"token budgets must be positive, got {budgets}")
    grid = []
    for size in sizes:
        for tokens in sorted(budgets):
            steps = math.ceil(tokens / (base.batch_size * base.block_size))
            grid.append((size, replace(base, tokens=tokens, warmup_steps=max(1, steps // 10))))
    points = train_points(data_dir or bench_data(corpus), grid, progress)
    n, d = [p["total_params"] for p in points], [p["tokens"] for p in points]
    losses = [p["val_loss"] for p in points]
    law = fit_data_law(n, d, losses)
    n_range, d_range = (min(n), max(n)), (min(d), max(d))
    frontier = compute_frontier(law, n_range, d_range)
    plot_data_scaling(points, law, plot_path, corpus)
    s = law.alpha + law.beta
    return {
        "corpus": corpus,
        "run": {k: v for k, v in asdict(base).items() if k not in ("tokens", "warmup_steps")},
        "points": points,
        "fit": {
            **asdict(law),
            "rmse": rmse(law(np.asarray(n, dtype=float), np.asarray(d, dtype=float)), losses),
            "formula": str(law),
            "n_opt_exponent": law.beta / s,  # N_opt ~ C^a
            "d_opt_exponent": law.alpha / s,  # D_opt ~ C^b
        },
        "frontier": frontier,
        "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM,
        "grid": {
            "params": list(n_range),
            "tokens": list(d_range),
            "compute": [6 * n_range[0] * d_range[0], 6 * n_range[1] * d_range[1]],
        },
        "note": (
            f"fitted on N = {n_range[0]:,}-{n_range[1]:,} parameters x D = {d_range[0]:,}-{d_range[1]:,} "
            f"tokens ({len(points)} runs); N_opt, D_opt and tokens per parameter outside that grid "
            "(inside_grid false) are extrapolation the data does not support"
        ),
        "plot": str(plot_path),
    }
