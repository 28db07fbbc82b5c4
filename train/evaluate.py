"""Evaluate a model's head on labelled clips: clip scores are the mean of the window
probabilities over the clip (`edgetag.runtime.clip_probabilities`: the windows and hop the
streaming engine uses). Any backend serves: a checkpoint (torch), an export folder or .onnx
file (ONNX Runtime, int8 included).

    python -m train.evaluate --ckpt runs/ft/best.safetensors --data ../shared/data/esc50 --head tags --json report.json
    python -m train.evaluate --data esc50:../shared/data/esc50,folds=4 --head tags \\
        --classes-from esc50:../shared/data/esc50_other_folds        # the bundled model, 50-way ESC-50

Prints the overall figures and a per-class table, writes a confusion-matrix PNG (single-label
data) beside --json (or --plot). The JSON report has `n`, `accuracy` and `macro_f1`
(single-label data) or `mAP` (multi-label data), and `per_class`. `spotting()` measures what
`edgetag file` reports: keyword spots and false alarms per hour, through the streaming engine.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag.checkpoint import DEFAULT_MODEL, CheckpointError
from edgetag.output import atomic
from edgetag.runtime import BACKENDS, BackendError, clip_probabilities, load_backend
from edgetag.spec import EVENT_KINDS, HEAD_KINDS, KEYWORDS, NOT_SPOTTED
from train import metrics
from train.data import Example, Source, load_clips, load_features

FIGURES = ("n", "accuracy", "macro_f1", "mAP")  # a report's headline figures (accuracy and macro-F1: single-label data)


def headline(results: dict[str, dict]) -> dict[str, dict]:
    """Each head's headline figures, without the per-class tables."""
    return {head: {k: r[k] for k in FIGURES if k in r} for head, r in results.items()}


def targets(examples: list[Example], labels: list[str]) -> torch.Tensor:
    """Multi-hot [N, C]; labels outside the head are ignored (the caller filters such clips)."""
    index = {label: i for i, label in enumerate(labels)}
    y = torch.zeros(len(examples), len(labels))
    for row, e in enumerate(examples):
        for label in e.labels:
            if label in index:
                y[row, index[label]] = 1.0
    return y


def clip_scores(backend, feats: list[torch.Tensor], head: str, batch_size: int = 256) -> np.ndarray:
    """[N, C] each clip's mean window probabilities, over the windows the streaming engine runs."""
    return np.stack([p[head].mean(0) for p in clip_probabilities(backend, feats, batch_size)])


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


def evaluate(backend, examples: list[Example], head: str, classes: list[str] | None = None, batch_size: int = 256) -> dict:
    """Score `examples` with one head of a backend (`edgetag.runtime.load_backend`). `classes`
    limits the classes that compete for a clip (ESC-50 is a 50-way task even when the head also
    knows DCASE's classes). Clips whose labels are all outside them, and unreadable clips, are
    left out and counted."""
    labels = list(backend.spec.heads[head].labels)
    scored = [label for label in labels if classes is None or label in classes]
    known = [e for e in examples if any(label in scored for label in e.labels)]
    feats = load_features(known, backend.spec.fbank, description="features")
    kept = [(e, f) for e, f in zip(known, feats) if f is not None]
    if not kept:
        raise ValueError(f"no readable clip has a label of the {head!r} head")
    scores = clip_scores(backend, [f for _, f in kept], head, batch_size)
    scores = scores[:, [labels.index(label) for label in scored]]
    result = report(scores, targets([e for e, _ in kept], scored), scored)
    result.update(labels=scored, skipped_unknown_label=len(examples) - len(known), skipped_unreadable=len(known) - len(kept))
    return result


def teacher_windows(x: np.ndarray, samples: int, hop: int) -> np.ndarray:
    """A clip's windows as the streaming engine cuts them: every hop, the last padded with silence."""
    starts = range(0, max(1, len(x) - samples + hop), hop) if len(x) > samples else [0]
    return np.stack([np.pad(x[s : s + samples], (0, max(0, samples - len(x[s : s + samples])))) for s in starts])


def evaluate_teacher(teacher, examples: list[Example], classes: list[str], window: float = 1.0, hop: float = 0.5, rate: int = 16000) -> dict:
    """A third-party teacher (train.teachers) as a peer on the task `evaluate` runs: its
    probabilities averaged over a clip's 1 s windows, every 0.5 s, among `classes` (those it has)."""
    scored = [label for label in classes if label in teacher.labels]
    columns = [list(teacher.labels).index(label) for label in scored]
    known = [e for e in examples if any(label in scored for label in e.labels)]
    readable = [(e, x) for e, x in zip(known, load_clips(known, rate, "teacher")) if x is not None]
    kept = [e for e, _ in readable]
    scores = [np.asarray(teacher(teacher_windows(x, round(window * rate), round(hop * rate))))[:, columns].mean(0) for _, x in readable]
    result = report(np.stack(scores), targets(kept, scored), scored)
    result.update(labels=scored, skipped_unknown_label=len(examples) - len(known), skipped_unreadable=len(known) - len(kept))
    return result


def spotting(backend, positives: list[Example], negatives: list[Example], post=None) -> dict:
    """Keyword spots as `edgetag file` makes them (the streaming engine with the backend's
    calibrated thresholds): false alarms per hour of `negatives` (audio without keywords; any
    spot counts), and per keyword the share of its `positives` clips spotted as that keyword."""
    from rich.progress import track

    from edgetag import audio
    from edgetag.stream import Engine, PostConfig, process_file

    engine = Engine(backend, post or PostConfig())
    head = backend.spec.head_of(KEYWORDS)

    def spots(examples: list[Example], description: str):
        for e in track(examples, description=description, transient=True):
            try:
                result = process_file(engine, e.path)
            except audio.AudioError:
                continue
            yield e, [event.label for event in result.events if event.kind == EVENT_KINDS[KEYWORDS]], result.seconds

    alarms, seconds = 0, 0.0
    for _, labels, duration in spots(negatives, "negatives"):
        alarms, seconds = alarms + len(labels), seconds + duration
    per_keyword: dict[str, list[int]] = {}  # label -> [clips, spotted as it, spotted as another]
    for e, labels, _ in spots([e for e in positives if e.labels[0] not in NOT_SPOTTED], "keywords"):
        counts = per_keyword.setdefault(e.labels[0], [0, 0, 0])
        counts[0] += 1
        counts[1] += e.labels[0] in labels
        counts[2] += any(label != e.labels[0] for label in labels)
    clips = sum(c[0] for c in per_keyword.values())
    return {
        "head": head, "negative_hours": seconds / 3600, "false_alarms": alarms, "false_alarms_per_hour": alarms / max(seconds / 3600, 1e-9),
        "keyword_clips": clips, "recall": sum(c[1] for c in per_keyword.values()) / max(clips, 1),
        "wrong_spots": sum(c[2] for c in per_keyword.values()) / max(clips, 1),
        "per_keyword": {label: {"clips": c[0], "recall": c[1] / c[0], "wrong": c[2] / c[0]} for label, c in per_keyword.items()},
    }


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
    data: str = typer.Option(..., help="Labelled clips: a source [READER:]PATH[,key=value] (train.data.Source)."),
    head: str = typer.Option(..., help=f"The head to score: {' or '.join(HEAD_KINDS)}."),
    ckpt: str = typer.Option(None, help="A checkpoint, an export folder or .onnx file; default: the bundled checkpoint (the card's student row)."),
    backend: str = typer.Option("auto", help=f"Inference backend: {', '.join(BACKENDS)}."),
    classes_from: str = typer.Option(None, help="Score among the classes of this source only (e.g. the 50 ESC-50 classes)."),
    json_out: Path = typer.Option(None, "--json", help="Write the report here; the confusion matrix goes beside it."),
    plot: Path = typer.Option(None, help="Confusion-matrix PNG (single-label data)."),
    batch_size: int = typer.Option(256),
) -> None:
    """Score one head of a model on labelled clips: accuracy and macro-F1 or mAP, per class."""
    for option, path in (("--json", json_out), ("--plot", plot)):
        if path is not None and not path.parent.is_dir():  # before the evaluation, not after it
            print(f"train.evaluate: error: {option}: {path.parent}: no such folder", file=sys.stderr)
            raise typer.Exit(2)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        try:
            runtime = load_backend(ckpt or DEFAULT_MODEL, backend)
            if head not in runtime.spec.heads:
                raise ValueError(f"{ckpt or 'the bundled model'} has no {head!r} head (it has: {', '.join(runtime.spec.heads) or 'none'})")
            kind = runtime.spec.heads[head].kind
            classes = sorted({label for e in Source.parse(classes_from, kind).read() for label in e.labels}) if classes_from else None
            result = evaluate(runtime, Source.parse(data, kind).read(), head, classes, batch_size)
        except (CheckpointError, BackendError, ValueError, FileNotFoundError) as e:
            print(f"train.evaluate: error: {e}", file=sys.stderr)
            raise typer.Exit(2) from e
    print_report(result, head)
    plot = plot or (json_out.with_suffix(".confusion.png") if json_out else None)
    if plot and "confusion" in result:
        plot_confusion(result["confusion"], result["labels"], plot, f"{runtime.model_id}: {head}")
    if json_out:
        with atomic(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
