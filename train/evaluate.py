"""Evaluate a checkpoint's head on labelled clips: clip scores are the mean of the window
probabilities over the clip (windows and hop as the streaming engine uses them).

    python -m train.evaluate --ckpt runs/ft/best.safetensors --data ../shared/data/esc50 --head tags --json report.json

Prints the overall figures and a per-class table, writes a confusion-matrix PNG (single-label
data) beside --json (or --plot). The JSON report has `n`, `accuracy` and `macro_f1`
(single-label data) or `mAP` (multi-label data), and `per_class`.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
import typer

import edgetag
from edgetag.features import FbankConfig, hop_frames, normalize, window_frames, windows
from edgetag.runtime import stream_settings
from train import metrics
from train.data import Example, load_features, read_examples

def targets(examples: list[Example], labels: list[str]) -> torch.Tensor:
    """Multi-hot [N, C]; labels outside the head are ignored (the caller filters such clips)."""
    index = {label: i for i, label in enumerate(labels)}
    y = torch.zeros(len(examples), len(labels))
    for row, e in enumerate(examples):
        for label in e.labels:
            if label in index:
                y[row, index[label]] = 1.0
    return y


@torch.no_grad()
def clip_scores(model, feats: list[torch.Tensor], head: str, fbank: FbankConfig, frames: int, hop: int, batch_size: int = 256) -> np.ndarray:
    """[N, C] mean window probabilities per clip."""
    device = next(model.parameters()).device
    per_clip = [windows(f, frames, hop) for f in feats]
    flat = torch.cat(per_clip)
    probs = []
    for i in range(0, len(flat), batch_size):
        probs.append(model.probabilities(normalize(flat[i : i + batch_size], fbank).to(device))[head].float().cpu())
    probs = torch.cat(probs)
    bounds = np.cumsum([0] + [len(w) for w in per_clip])
    return torch.stack([probs[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]).numpy()


def single_label(y: torch.Tensor) -> bool:
    return bool((y.sum(1) == 1).all())


def report(scores: np.ndarray, y: torch.Tensor, labels: list[str]) -> dict:
    """Overall and per-class figures; accuracy and macro-F1 for single-label data, mAP always."""
    y = y.numpy()
    ap = metrics.ap_per_class(scores, y)
    out = {"n": int(len(y)), "mAP": float(np.nanmean(ap)), "per_class": {}}
    if single_label(torch.from_numpy(y)):
        truth = y.argmax(1)
        matrix = metrics.confusion(scores, truth, len(labels))
        f1 = metrics.f1_per_class(matrix)
        out.update(accuracy=metrics.accuracy(scores, truth), macro_f1=metrics.macro_f1(scores, truth), confusion=matrix.tolist())
        for c, label in enumerate(labels):
            support = int(matrix[c].sum())
            out["per_class"][label] = {"n": support, "accuracy": float(matrix[c, c] / support) if support else None, "f1": float(f1[c]), "ap": _finite(ap[c])}
    else:
        for c, label in enumerate(labels):
            out["per_class"][label] = {"n": int(y[:, c].sum()), "ap": _finite(ap[c])}
    return out


def _finite(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


def primary(result: dict) -> float:
    """The figure to select models by: accuracy for single-label data, else mAP."""
    return result.get("accuracy", result["mAP"])


def plot_confusion(matrix: np.ndarray, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, dtype=float)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    size = max(5, 0.28 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(model, examples: list[Example], head: str, batch_size: int = 256) -> dict:
    """Score `examples` with one head of a loaded edgetag model. Clips whose labels are all
    outside the head, and unreadable clips, are left out and counted."""
    labels = list(model.head_configs[head].labels)
    known = [e for e in examples if any(label in labels for label in e.labels)]
    feats = load_features(known, model.fbank, description="features")
    kept = [(e, f) for e, f in zip(known, feats) if f is not None]
    if not kept:
        raise ValueError(f"no readable clip has a label of the {head!r} head")
    window, hop = stream_settings(model.config)
    frames, hop = window_frames(window, model.fbank), hop_frames(hop, model.fbank)
    scores = clip_scores(model, [f for _, f in kept], head, model.fbank, frames, hop, batch_size)
    result = report(scores, targets([e for e, _ in kept], labels), labels)
    result.update(labels=labels, skipped_unknown_label=len(examples) - len(known), skipped_unreadable=len(known) - len(kept))
    return result


def print_report(result: dict, head: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{head}: per class")
    single = "accuracy" in result
    for column in ("class", "n", *(("accuracy", "F1") if single else ()), "AP"):
        table.add_column(column, justify="left" if column == "class" else "right")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for label, row in result["per_class"].items():
        table.add_row(label, str(row["n"]), *((fmt(row["accuracy"]), fmt(row["f1"])) if single else ()), fmt(row["ap"]))
    console = Console()
    console.print(table)
    overall = f"accuracy {result['accuracy']:.4f}  macro-F1 {result['macro_f1']:.4f}  " if single else ""
    console.print(f"n {result['n']}  {overall}mAP {result['mAP']:.4f}")
    for key in ("skipped_unknown_label", "skipped_unreadable"):
        if result.get(key):
            console.print(f"{key.replace('_', ' ')}: {result[key]}")


def main(
    data: str = typer.Option(..., help="Labelled clips: a manifest, a dataset folder, or READER:PATH[,key=value] (see train.data.read_examples)."),
    head: str = typer.Option(..., help="tags or keywords."),
    ckpt: str = typer.Option(..., help="An edgetag checkpoint."),
    json_out: Path = typer.Option(None, "--json", help="Write the report here; the confusion matrix goes beside it."),
    plot: Path = typer.Option(None, help="Confusion-matrix PNG (single-label data)."),
    batch_size: int = typer.Option(256),
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        model = edgetag.load_model(ckpt)
        if head not in model.head_configs:
            raise typer.BadParameter(f"{ckpt} has no {head!r} head (it has: {', '.join(model.head_configs) or 'none'})")
        result = evaluate(model, read_examples(data, model.head_configs[head].kind), head, batch_size)
    print_report(result, head)
    plot = plot or (json_out.with_suffix(".confusion.png") if json_out else None)
    if plot and "confusion" in result:
        plot_confusion(result["confusion"], result["labels"], plot, f"{Path(str(ckpt)).name}: {head}")
    if json_out:
        json_out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    typer.run(main)
