"""CPU backends side by side: per-window latency (batch 1, as a live hop) at 1 and 2 threads.

    python -m deploy.bench --ckpt runs/student/best.safetensors --export export/

Backends: torch fp32 (eager, the baseline), torch-int8 (torchao dynamic int8 + torch.compile),
ONNX Runtime fp32 (model.onnx) and int8 (model.int8.onnx). Ratios are measured in one run. What
int8 costs in accuracy is measured on labelled clips by `python -m train.evaluate --ckpt
export/model.int8.onnx` (or `--backend torch-int8`) against the checkpoint.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag.runtime import OnnxBackend, TorchBackend, TorchInt8Backend


def latency(backend, x: np.ndarray, repeats: int) -> float:
    """Median seconds per call on one normalised window."""
    for _ in range(5):
        backend.forward(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.forward(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def backends(ckpt: Path, export: Path, threads: int, compile_int8: bool) -> dict:
    # torch's thread count is global; ONNX Runtime sizes a pool per session
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "torch fp32": TorchBackend.load(ckpt),
            "torch-int8": TorchInt8Backend.load(ckpt, compile=compile_int8),
            "onnx fp32": OnnxBackend(export / "model.onnx", threads=threads),
            "onnx int8": OnnxBackend(export / "model.int8.onnx", threads=threads),
        }


def main(
    ckpt: Path = typer.Option(..., help="The checkpoint (torch backends)."),
    export: Path = typer.Option(..., help="Its export folder from deploy.export (ONNX backends)."),
    repeats: int = typer.Option(200),
    compile_int8: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile the torchao int8 model."),
) -> None:
    """Per-window latency of the CPU backends at 1 and 2 threads, against eager torch fp32."""
    from rich.console import Console
    from rich.table import Table

    results: dict[str, dict[int, float]] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        found = backends(ckpt, export, threads, compile_int8)
        spec = found["torch fp32"].spec
        x = np.random.default_rng(0).standard_normal((1, spec.window_frames, spec.encoder.n_mels)).astype(np.float32)
        for name, backend in found.items():
            results.setdefault(name, {})[threads] = latency(backend, x, repeats)

    table = Table(title=f"{found['torch fp32'].model_id}: one {spec.window_seconds:.3f} s window (batch 1)")
    for column in ("backend", "1 thread", "x fp32", "2 threads", "x fp32"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    base = results["torch fp32"]
    for name, r in results.items():
        table.add_row(name, f"{r[1] * 1000:.2f} ms", f"{base[1] / r[1]:.2f}x", f"{r[2] * 1000:.2f} ms", f"{base[2] / r[2]:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
