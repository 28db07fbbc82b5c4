"""How events leave edgetag: a rich table for people, JSON lines and CSV for machines, a plot.

One event record, the same for `file` and `listen`: file, kind (tag or keyword), label, start,
end, score (seconds from the start of the file or stream), model, and task for an event of one
of the model's tasks; `listen` adds `time`, the wall-clock time (ISO 8601) the event was emitted.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from edgetag.spec import EVENT_KINDS, TAGS, ModelSpec
from edgetag.stream import Event, Result

FIELDS = ("file", "kind", "label", "start", "end", "score", "model", "task")


def record(event: Event, file: str, model: str, **extra) -> dict:
    return {"file": file, **event.to_dict(), "model": model, **extra}


def json_line(row: dict, out=None) -> None:
    print(json.dumps(row), file=out or sys.stdout, flush=True)


class CsvOut:
    def __init__(self, out=None):
        self.writer = csv.DictWriter(out or sys.stdout, fieldnames=FIELDS, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, row: dict) -> None:
        self.writer.writerow(row)


def print_table(rows: list[dict], title: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]{title}[/]", soft_wrap=True)
    table = Table()
    tasks = any("task" in r for r in rows)
    for column, justify in (("kind", "left"), ("label", "left"), ("start", "right"), ("end", "right"), ("score", "right"), *([("task", "left")] if tasks else [])):
        table.add_column(column, justify=justify)
    for r in rows:
        table.add_row(r["kind"], r["label"], f"{r['start']:.2f}", f"{r['end']:.2f}", f"{r['score']:.2f}", *([r.get("task", "")] if tasks else []))
    if not rows:
        table.add_row("-", "nothing above threshold", "", "", "")
    console.print(table)


@contextmanager
def atomic(path) -> Iterator[Path]:
    """A temporary path beside `path` to write to: it becomes `path` when the block ends without
    error and is removed otherwise, so no reader ever sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_paths(plot: Path, files: list[str]) -> dict[str, Path]:
    """Where each file's plot goes: `plot` itself for one file, NAME_<file stem>.png for several
    (NAME_<stem>_2.png for a second file of the same stem). Refused before any work (ValueError):
    a format matplotlib cannot write, a missing folder, or a plot that would overwrite an input."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ValueError("--plot needs matplotlib: pip install 'edgetag[plot]'") from e
    formats = Figure().canvas.get_supported_filetypes()
    if plot.suffix.lstrip(".").lower() not in formats:
        raise ValueError(f"--plot: {plot}: not an image format matplotlib writes ({', '.join(sorted(formats))})")
    if not plot.parent.is_dir():
        raise ValueError(f"--plot: {plot.parent}: no such folder")
    targets: dict[str, Path] = {}
    for f in files:
        target = plot if len(files) == 1 else plot.with_name(f"{plot.stem}_{Path(f).stem}{plot.suffix}")
        n = 1
        while target in targets.values():
            n += 1
            target = plot.with_name(f"{plot.stem}_{Path(f).stem}_{n}{plot.suffix}")
        targets[f] = target
    inputs = {Path(f).resolve() for f in files}
    for target in targets.values():
        if target.resolve() in inputs:
            raise ValueError(f"--plot: {target} is one of the inputs; plot elsewhere")
    return targets


def spectrogram(path, config, columns: int = 2400) -> np.ndarray:
    """A file's log-mel for a plot: streamed block by block and averaged down to at most
    `columns` frames, so memory stays bounded however long the file (a plot cannot show more)."""
    from edgetag import audio
    from edgetag.features import StreamingFbank

    info = audio.info(path)
    frames = config.num_frames(round(info.duration * config.sample_rate))
    group = max(1, -(-frames // columns))  # frames per column
    stream, pooled, rest = StreamingFbank(config), [], np.zeros((0, config.n_features), np.float32)
    for block in audio.stream(path, config.sample_rate):
        rest = np.concatenate([rest, stream.push(block)])
        whole = len(rest) // group * group
        pooled.append(rest[:whole].reshape(-1, group, rest.shape[1]).mean(axis=1))  # [columns, group, F] -> [columns, F]
        rest = rest[whole:]
    if len(rest):
        pooled.append(rest.mean(axis=0, keepdims=True))
    return np.concatenate(pooled) if pooled else np.zeros((0, config.n_features), np.float32)


def plot(features: np.ndarray, result: Result, spec: ModelSpec, path: Path, title: str, top: int = 8) -> None:
    """Spectrogram (`features`, frames spread over the stream's duration: see `spectrogram`),
    then for each head the probability timeline of its most active classes, with the events
    shaded (tags) or marked (keywords)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops, heads = result.hops, spec.heads
    names = [n for n in heads if hops]
    fig, axes = plt.subplots(1 + len(names), 1, figsize=(11, 2.6 * (1 + len(names))), sharex=True, squeeze=False)
    axes = axes[:, 0]
    duration = result.seconds
    axes[0].imshow(features.T, origin="lower", aspect="auto", extent=(0, duration, 0, features.shape[1]), cmap="magma")
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(title)
    centres = np.array([(h.start + h.end) / 2 for h in hops])
    for ax, name in zip(axes[1:], names):
        probs = np.stack([h.probabilities[name] for h in hops])  # [hops, classes]
        head = heads[name]
        shown = [c for c in np.argsort(-probs.max(0))[:top] if head.spotted[c]]
        for c in shown:
            line, = ax.plot(centres, probs[:, c], label=head.labels[c])
            for e in result.events:
                if e.label == head.labels[c] and e.kind == EVENT_KINDS[head.kind]:
                    if head.kind == TAGS:
                        ax.axvspan(e.start, e.end, color=line.get_color(), alpha=0.15)
                    else:
                        ax.axvline((e.start + e.end) / 2, color=line.get_color(), linestyle="--")
                        ax.annotate(e.label, ((e.start + e.end) / 2, 1.02), color=line.get_color(), fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel(f"{name} p")
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
