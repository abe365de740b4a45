"""The training loop: schedule, weight-decay groups, overfitting, exact resume, checkpoints, outputs, CLI."""

from __future__ import annotations

import json
import math

import matplotlib.image
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rag.llm import checkpoint as ckpt
from rag.llm.cli import app
from rag.llm.data import prepare_corpus
from rag.llm.model import GPT, ModelConfig
from rag.llm.train import (
    CURVE_FILE,
    METRICS_FILE,
    TrainConfig,
    lr_at,
    param_groups,
    peak_flops,
    peak_flops_for,
    train_lm,
)
from tests.llm.test_data import corpus, one_thread, tokenizer  # noqa: F401  (fixtures)

TINY_MODEL = {"block_size": 32, "n_layer": 1, "n_head": 2, "n_kv_head": 1, "d_model": 32}


def tiny_config(data_dir, out_dir, **overrides) -> TrainConfig:
    """A CPU run of a 1-layer, 32-wide model: a step takes milliseconds."""
    base = dict(
        data_dir=str(data_dir), out_dir=str(out_dir), model="tiny", model_overrides=dict(TINY_MODEL),
        batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=10, eval_interval=5, eval_iters=2,
        log_interval=1, progress=False, device="cpu", seed=7,
    )  # fmt: skip
    return TrainConfig(**{**base, **overrides})


def test_warmup_then_cosine_schedule():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup, peak at step 9
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111], strict=True))  # monotone decay
    assert lrs[60] == pytest.approx(0.55)  # cosine midpoint: halfway between lr and min_lr
    assert lrs[110:] == pytest.approx([0.1] * 10)  # floor after max_steps


def test_weight_decay_only_on_matrices_not_embeddings_norms_biases():
    model = GPT(ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), **TINY_MODEL, "bias": True}))
    decay, no_decay = (g["params"] for g in param_groups(model, 0.1))
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay).isdisjoint(ids(no_decay))
    assert ids(decay) | ids(no_decay) == ids(model.parameters())  # each parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    assert id(model.tok_emb.weight) in ids(no_decay)  # the embedding (tied to lm_head)
    assert all(p.dim() >= 2 for p in decay)
    assert any("norm" in names[id(p)] for p in no_decay) and any(
        names[id(p)].endswith("bias") for p in no_decay
    )
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)} - {
        id(model.tok_emb.weight)
    }
    assert linear and linear <= ids(decay)


def test_peak_flops_table():
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_flops_for("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("NVIDIA L40S") == 362e12  # not the L4 entry
    assert peak_flops_for("Some Future GPU") is None
    assert peak_flops(torch.device("cpu")) is None  # no MFU on CPU


def test_overfits_a_small_batch(tmp_path, tokenizer):  # noqa: F811
    """A 40-token training set: the real loop must drive the loss close to zero."""
    text = "The old king sings over the bright river."
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "val.txt").write_text(text)
    prepare_corpus([tmp_path / "train.txt"], tokenizer, tmp_path / "d", val_paths=[tmp_path / "val.txt"])
    overrides = {**TINY_MODEL, "block_size": 8}
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", model_overrides=overrides, max_steps=60, lr=1e-2,
                      min_lr=1e-3, weight_decay=0.0, eval_interval=60, log_interval=1)  # fmt: skip
    result = train_lm(cfg)
    assert result.history[0]["loss"] > 5.0  # ~ln(320) = 5.8 at random init
    assert result.train_loss < 0.1 and result.val_loss < 0.1


def test_exact_resume_matches_uninterrupted_run(tmp_path, corpus):  # noqa: F811
    """2N steps == N steps + resume + N steps, bit for bit (dropout on: the RNG state is restored too)."""
    common = dict(max_steps=8, grad_accum=2, eval_interval=4, model_overrides={**TINY_MODEL, "dropout": 0.1})
    straight = train_lm(tiny_config(corpus, tmp_path / "a", **common))
    train_lm(tiny_config(corpus, tmp_path / "b", stop_step=4, **common))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dropout"] == 0.1
    with pytest.raises(FileExistsError, match="resume"):
        train_lm(tiny_config(corpus, tmp_path / "b", **common))
    resumed = train_lm(tiny_config(corpus, tmp_path / "b", resume=True, **common))

    a, b = load_file(tmp_path / "a" / ckpt.WEIGHTS_FILE), load_file(tmp_path / "b" / ckpt.WEIGHTS_FILE)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    initial = GPT(ckpt.load_config(tmp_path / "a"))
    assert not all(torch.equal(a[k], v) for k, v in initial.state_dict().items() if k in a)  # it did train
    assert resumed.step == straight.step == 8 and resumed.val_loss == straight.val_loss
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "tok_per_s"} for r in rows]  # noqa: E731
    assert timeless(resumed.history) == timeless(straight.history)  # metrics.jsonl continued seamlessly
    sa = ckpt.load_train_state(tmp_path / "a")
    sb = ckpt.load_train_state(tmp_path / "b")
    assert sa["sampler"] == sb["sampler"] == {"draws": 16, "seed": 7}


def test_checkpoint_round_trip_gives_identical_logits(tmp_path, tokenizer):  # noqa: F811
    torch.manual_seed(0)
    model = GPT(
        ModelConfig.from_dict({**ModelConfig.preset("tiny").to_dict(), **TINY_MODEL, "vocab_size": 320})
    )
    ckpt.save_checkpoint(tmp_path, model, tokenizer, {"step": 3, "note": "x"})
    loaded, tok = ckpt.load_checkpoint(tmp_path)
    idx = torch.tensor([tokenizer.encode("The king walks over the river.")])
    with torch.no_grad():
        assert torch.equal(model.eval()(idx).logits, loaded(idx).logits)
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # tying survives the de-duplicated file
    assert tok.to_json() == tokenizer.to_json()
    assert ckpt.load_train_state(tmp_path)["step"] == 3
    ckpt.save_checkpoint(tmp_path, model, tokenizer, None)  # weights now claim no step: a torn pair
    with pytest.raises(ckpt.CheckpointError, match="interrupted"):
        ckpt.load_train_state(tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(tmp_path / "nope")


def test_metrics_log_and_loss_curve_png(tmp_path, corpus):  # noqa: F811
    result = train_lm(tiny_config(corpus, tmp_path / "run", max_steps=30, eval_interval=10, log_interval=5))
    rows = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20, 25, 30]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["tok_per_s"] > 0 and "mfu" not in r for r in train_rows)  # CPU: no MFU
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] < math.log(320)  # it learns
    assert result.val_loss == evals[-1]["val_loss"]
    png = tmp_path / "run" / CURVE_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(png)
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0  # a real, non-blank plot


def test_moe_perplexity_leaves_out_the_aux_loss(tmp_path, corpus):  # noqa: F811
    """Perplexity is exp(cross-entropy): a (here huge) load-balancing term is logged apart, not in it."""
    moe = {**TINY_MODEL, "ffn": "moe", "n_experts": 4, "moe_aux_weight": 50.0}
    train_lm(tiny_config(corpus, tmp_path / "moe", model_overrides=moe, max_steps=2, eval_interval=2))
    rows = [json.loads(line) for line in (tmp_path / "moe" / METRICS_FILE).read_text().splitlines()]
    (val,) = [r for r in rows if r["kind"] == "eval"]
    assert val["val_aux"] > 25.0  # the balance loss is about 1 (exactly 1 when balanced), times the weight
    assert val["val_loss"] == pytest.approx(val["val_ce"] + val["val_aux"], rel=1e-5)
    assert val["val_ppl"] == pytest.approx(math.exp(val["val_ce"])) and val["val_ppl"] < 2 * 320
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["loss"] == pytest.approx(r["ce"] + r["aux"], rel=1e-5) for r in train)


def test_cli_trains_and_reports_bad_input(tmp_path, corpus):  # noqa: F811
    runner = CliRunner()
    out = tmp_path / "cli-run"
    args = ["lm", "--data", str(corpus), "--out", str(out), "--max-steps", "4", "--device", "cpu",
            "--set", "eval_interval=4", "--set", "eval_iters=1", "--set", "progress=false"]  # fmt: skip
    for key, value in TINY_MODEL.items():
        args += ["--set", f"model.{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["d_model"] == 32
    assert ckpt.load_train_state(out)["step"] == 4

    bad = runner.invoke(app, ["lm", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "rag train prepare" in bad.output
    bad = runner.invoke(app, ["lm", "--data", str(corpus), "--set", "no_such_field=1"])
    assert bad.exit_code == 1 and "no_such_field" in bad.output
