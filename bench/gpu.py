"""One prepared run for a lent GPU: training tokens/s and MFU, decode tokens/s eager vs compiled.

The device machine has its own PyTorch and no project virtualenv (and no pydantic), so this runs
as a plain module over the checkout, with nothing to install and no data to carry (training
throughput uses random tokens; decoding speed does not depend on the weights):

    PYTHONUNBUFFERED=1 python3 -m bench.gpu --out "$OUT"

Every part is written to OUT/gpu.json as soon as it is measured, so a run cut short keeps what
it had; a part that fails records its error and the others still run. `--device cpu --quick`
rehearses the same code on a CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.llm import compiled_decoding, training_throughput
from rag.llm.model import ModelConfig

# Training configurations timed: the default preset as shipped, then the two levers for MFU on
# a big GPU -- a larger micro-batch, and a wider model (tiny matmuls cannot fill an H100).
TRAIN_RUNS: dict[str, dict] = {
    "default": {},
    "default, micro-batch 64": {"batch_size": 64, "grad_accum": 1},
    "d1024 x 16 layers (~200M)": {
        "model_overrides": {"d_model": 1024, "n_layer": 16, "n_head": 16, "n_kv_head": 8},
        "batch_size": 16,
        "grad_accum": 1,
    },
}
QUICK_RUNS: dict[str, dict] = {"tiny": {"batch_size": 4, "grad_accum": 1}}


def measure(results: dict, name: str, fn: Callable[[], dict], out: Path | None) -> None:
    """Run one part, store its result (or its error), print it and save everything so far."""
    t0 = time.perf_counter()
    try:
        results[name] = {**fn(), "wall_s": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001  (one failing part must not lose the others)
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    print(name, json.dumps(results[name], default=str), flush=True)
    if out is not None:
        (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps: a CPU rehearsal")
    args = parser.parse_args(argv)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    results: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(args.device) if cuda else platform.processor() or "cpu",
    }
    preset = "tiny" if args.quick else "default"
    steps = {"steps": 3, "warmup": 1} if args.quick else {"steps": 20, "warmup": 5}
    for name, overrides in (QUICK_RUNS if args.quick else TRAIN_RUNS).items():
        run = {**overrides, **({} if cuda else {"compile": False})}
        measure(
            results,
            f"train: {name}",
            lambda r=run: training_throughput(args.device, preset, **steps, **r),
            args.out,
        )
    dtype = torch.bfloat16 if cuda else torch.float32
    for position in (64, 200) if args.quick else (512, 1000):
        measure(
            results,
            f"decode @{position}",
            lambda p=position: compiled_decoding(
                ModelConfig.preset(preset),
                args.device,
                dtype,
                position=p,
                new_tokens=16 if args.quick else 128,
            ),
            args.out,
        )
    return results


if __name__ == "__main__":
    main()
