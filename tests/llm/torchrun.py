"""Helpers of the multi-process tests (DDP, FSDP): launch real gloo ranks under torchrun on the CPU and
compare the checkpoint they write with a one-process run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from rag.llm import checkpoint as ckpt
from rag.llm.model import GPT
from rag.llm.train import TrainConfig
from tests.conftest import ROOT


def cli_args(cfg: TrainConfig) -> list[str]:
    """The same TrainConfig as `rag train lm --set ...` options."""
    args = []
    for key, value in asdict(cfg).items():
        if key == "model_overrides":
            args += [a for k, v in value.items() for a in ("--set", f"model.{k}={json.dumps(v)}")]
        else:
            args += ["--set", f"{key}={json.dumps(value)}"]
    return args


def torchrun(args: list[str], cwd: Path, nproc: int = 2) -> None:
    """`torchrun --standalone -m rag.llm.cli ARGS` with nproc CPU ranks (gloo), one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run([*launch, "-m", "rag.llm.cli", *args],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def initial_weights(cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The weights train_lm starts from (it seeds with cfg.seed before building the model)."""
    torch.manual_seed(cfg.seed)
    return GPT(ckpt.load_config(cfg.out_dir)).state_dict()


def assert_same_weights(run: Path, reference: Path, initial: dict[str, torch.Tensor] | None = None) -> None:
    """The two checkpoints hold the same tensors under the same names (to 1e-5); with `initial`, every
    matrix of the reference also moved away from it (so equal weights are not just untrained ones)."""
    got, want = load_file(run / ckpt.WEIGHTS_FILE), load_file(reference / ckpt.WEIGHTS_FILE)
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-5, rtol=0)
        if initial is not None:
            assert not torch.equal(w, initial[name]) or "norm" in name
