"""CPU backends side by side: per-window latency (batch 1, as a live hop) at 1 and 2 threads,
and each int8 path's accuracy change on labelled clips.

    python -m deploy.bench --ckpt runs/student/best.safetensors --export export/ \\
        --data ../shared/data/speech_commands --head keywords --val-percent 20

Backends: torch fp32 (eager, the baseline), torch-int8 (torchao dynamic int8 + torch.compile),
ONNX Runtime fp32 (model.onnx) and int8 (model.int8.onnx). Ratios are measured in one run.
Accuracy: clip scores are the mean window probabilities, as `train.evaluate` computes them; with
--val-percent the clips are the validation split the model was selected on.
"""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag.features import hop_frames, normalize, window_frames, windows
from edgetag.runtime import OnnxBackend, TorchBackend, TorchInt8Backend


def latency(backend, x: torch.Tensor, repeats: int) -> float:
    """Median seconds per call on one window."""
    for _ in range(5):
        backend(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def accuracy(backend, feats: list[torch.Tensor], targets: np.ndarray, head: str) -> float:
    frames, hop = window_frames(backend.window, backend.fbank), hop_frames(backend.hop, backend.fbank)
    scores = np.stack([backend(normalize(windows(f, frames, hop), backend.fbank))[head].mean(0) for f in feats])
    return float((scores.argmax(1) == targets).mean())


def main(
    ckpt: Path = typer.Option(..., help="The checkpoint (torch backends)."),
    export: Path = typer.Option(..., help="Its export folder from deploy.export (ONNX backends)."),
    data: str = typer.Option(None, help="Labelled clips for the accuracy change (train.data source spec)."),
    head: str = typer.Option("keywords"),
    val_percent: float = typer.Option(0.0, help="Use only this share's validation split of --data (0: all clips)."),
    repeats: int = typer.Option(200),
    compile_int8: bool = typer.Option(True, "--compile/--no-compile", help="torch.compile the torchao int8 model."),
) -> None:
    from rich.console import Console
    from rich.table import Table

    torch.set_num_threads(1)
    def make(threads: int) -> dict:
        # torch's thread count is global; ONNX Runtime sizes a pool per session
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {
                "torch fp32": TorchBackend(ckpt),
                "torch-int8": TorchInt8Backend(ckpt, compile=compile_int8),
                "onnx fp32": OnnxBackend(export / "model.onnx", threads=threads),
                "onnx int8": OnnxBackend(export / "model.int8.onnx", threads=threads),
            }

    results: dict[str, dict] = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        backends = make(threads)
        first = backends["torch fp32"]
        x = torch.randn(1, window_frames(first.window, first.fbank), first.fbank.n_mels)
        for name, backend in backends.items():
            results.setdefault(name, {})[threads] = latency(backend, x, repeats)

    if data:
        from train.data import load_features, read_examples, split_examples

        examples = read_examples(data, first.heads[head].kind)
        if val_percent:
            examples = split_examples(examples, val_percent)[1]
        labels = list(first.heads[head].labels)
        examples = [e for e in examples if e.labels[0] in labels]
        feats = load_features(examples, first.fbank)
        kept = [(e, f) for e, f in zip(examples, feats) if f is not None]
        targets = np.array([labels.index(e.labels[0]) for e, _ in kept])
        torch.set_num_threads(2)
        for name, backend in backends.items():
            results[name]["accuracy"] = accuracy(backend, [f for _, f in kept], targets, head)

    table = Table(title=f"{first.model_id}: one {first.window:.2f} s window (batch 1)")
    for column in ("backend", "1 thread", "x fp32", "2 threads", "x fp32", *(("accuracy", "change") if data else ())):
        table.add_column(column, justify="left" if column == "backend" else "right")
    base = results["torch fp32"]
    for name, r in results.items():
        row = [name, f"{r[1] * 1000:.2f} ms", f"{base[1] / r[1]:.2f}x", f"{r[2] * 1000:.2f} ms", f"{base[2] / r[2]:.2f}x"]
        if data:
            row += [f"{100 * r['accuracy']:.2f}%", f"{100 * (r['accuracy'] - base['accuracy']):+.2f} pt"]
        table.add_row(*row)
    Console().print(table)
    if data:
        print(f"accuracy on {len(kept)} clips of {data}" + (f" (validation split, {val_percent:g}%)" if val_percent else ""))


if __name__ == "__main__":
    typer.run(main)
