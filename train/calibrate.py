"""Per-class thresholds for a model, measured by the code that runs live, through the backend
that will run it: the streaming engine makes each clip's hop probabilities, and its
post-processor (`PostProcessor.replay`) turns them into the events `edgetag file` would print
at the thresholds tried.

    python -m train.calibrate --ckpt runs/student/best.safetensors \\
        --keywords ../shared/data/speech_commands,split=val,percent=20 \\
        --negatives ../shared/data/background_noise --negatives esc50:../shared/data/esc50,folds=4 \\
        --tags esc50:../shared/data/esc50,folds=4 --out runs/student/calibrated.safetensors
    python -m train.calibrate --export export/ --keywords ... --negatives ... --tags ...

Keywords: per keyword, the lowest threshold on the grid whose spots on audio without keywords
(the negatives, plus the `_unknown_`/`_silence_` clips of --keywords) stay at or below
--false-alarms-per-hour, each keyword tried alone (the others never fire, so its count bounds
what it adds live). Raising a threshold only removes spots (the refractory period keeps the
earliest of each run, and that count never grows on a subset), so the grid is bisected. Tags:
per class, the threshold with the best clip-level F1 on --tags (a clip is positive when the
post-processor makes an event of that class). The thresholds go into a copy of the checkpoint
(`ModelSpec.thresholds`, which the engine reads) with the measured figures under `calibration`;
for an export (`--export`), each ONNX file the CPU runs (fp32, dynamic int8) gets its own, measured
through ONNX Runtime on that file, in manifest.json (int8 shifts probabilities a little, and a
threshold at 0.99 has no room for that).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import typer

from edgetag import checkpoint
from edgetag.runtime import Backend, BackendError, OnnxBackend, TorchBackend, record_thresholds
from edgetag.spec import KEYWORDS, NOT_SPOTTED, TAGS, ModelSpec
from edgetag.stream import Engine, Event, PostConfig, PostProcessor, process_file, speech_gated
from train.data import Example, Source

# Thresholds tried: every hundredth, then finer at the top, where a confident keyword head puts
# other words too (one student's running-audio false alarms went from 10.5 to 2.6 per hour
# between 0.99 and 0.998)
GRID = np.concatenate([np.round(np.arange(0.30, 1.0, 0.01), 2), [0.995, 0.998, 0.999]])

Stream = dict[str, np.ndarray]  # head -> [hops, classes]: one clip through the engine


def hop_probabilities(engine: Engine, examples: list[Example], description: str) -> tuple[list[Example], list[Stream], float]:
    """The readable clips, their hop probabilities and the seconds of audio they hold."""
    from rich.progress import track

    from edgetag import audio

    kept, streams, seconds = [], [], 0.0
    for e in track(examples, description=description, transient=True):
        try:
            result = process_file(engine, e.path)
        except audio.AudioError:
            continue
        kept.append(e)
        streams.append({name: np.stack([h.probabilities[name] for h in result.hops]) for name in engine.spec.heads})
        seconds += result.seconds
    return kept, streams, seconds


def head_processor(spec: ModelSpec, post: PostConfig, head: str, thresholds: dict[str, float] | None = None) -> PostProcessor:
    """The post-processor of one head alone (its calibrated thresholds and speech gate left out:
    the caller tries its own), at `thresholds` (labels left out: never)."""
    never = dict.fromkeys(spec.heads[head].labels, math.inf)
    return PostProcessor(replace(spec, heads={head: spec.heads[head]}, thresholds={}, speech_gate=0.0), post, {head: never | (thresholds or {})})


def replay(spec: ModelSpec, post: PostConfig, head: str, thresholds: dict[str, float], streams: list[Stream], speech_gate: float = 0.0) -> list[list[Event]]:
    """Per stream, the events one head makes at these thresholds (labels left out: never), its
    keywords gated on the model's Speech tag at `speech_gate` as the engine gates them."""
    processor = head_processor(spec, post, head, thresholds)
    return [processor.replay({head: speech_gated(spec, s, speech_gate)[head]}) for s in streams]


def calibrate_keywords(spec: ModelSpec, post: PostConfig, head: str, negatives: list[Stream], hours: float,
                       positives: dict[str, list[Stream]], target_per_hour: float, speech_gate: float = 0.0) -> dict:
    result = {"negative_hours": hours, "classes": {}}
    for label in spec.heads[head].labels:
        if label in NOT_SPOTTED:
            continue
        alarms = lambda t: sum(map(len, replay(spec, post, head, {label: float(t)}, negatives, speech_gate)))  # noqa: E731
        lo, hi = 0, len(GRID) - 1  # the lowest grid point within the target, else the top
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if alarms(GRID[mid]) / hours <= target_per_hour else (mid + 1, hi)
        chosen = float(GRID[lo])
        count = alarms(chosen)
        pos = positives.get(label, [])
        hits = sum(bool(events) for events in replay(spec, post, head, {label: chosen}, pos, speech_gate))
        result["classes"][label] = {"threshold": chosen, "false_alarms": count, "false_alarms_per_hour": count / hours,
                                    "recall": hits / len(pos) if pos else None, "positives": len(pos)}
    return result


def calibrate_tags(spec: ModelSpec, post: PostConfig, head: str, streams: list[Stream], truth: np.ndarray) -> dict:
    labels = spec.heads[head].labels
    detected = np.zeros((len(GRID), len(streams), len(labels)), dtype=bool)  # [thresholds, clips, classes]
    for i, t in enumerate(GRID):
        for j, events in enumerate(replay(spec, post, head, dict.fromkeys(labels, float(t)), streams)):
            detected[i, j, [labels.index(e.label) for e in events]] = True
    out = {}
    for c, label in enumerate(labels):
        if not truth[:, c].any():
            continue
        pred, true = detected[:, :, c], truth[None, :, c]
        tp, fp, fn = (pred & true).sum(1), (pred & ~true).sum(1), (~pred & true).sum(1)
        f1 = 2 * tp / np.maximum(1, 2 * tp + fp + fn)
        best = int(np.argmax(f1))
        out[label] = {"threshold": float(GRID[best]), "f1": float(f1[best]), "positives": int(truth[:, c].sum())}
    return out


def thresholds_of(backend: Backend, keywords: list[str], negatives: list[str], tags: list[str], target_per_hour: float = 1.0,
                  post: PostConfig | None = None) -> tuple[dict, dict]:
    """Thresholds measured through `backend`, and what they were measured on (the spec's
    `calibration`)."""
    post = post or PostConfig()
    engine = Engine(backend, post)
    spec, thresholds, report = engine.spec, {}, {}
    for name, head in spec.heads.items():
        if head.kind == KEYWORDS and keywords:
            examples = [e for text in keywords for e in Source.parse(text, KEYWORDS).read() if e.labels[0] in head.labels]
            quiet = [e for e in examples if e.labels[0] in NOT_SPOTTED] + [e for text in negatives for e in Source.parse(text, KEYWORDS).read()]
            _, neg, seconds = hop_probabilities(engine, quiet, "negatives")
            positives = {}
            for label in head.labels:
                if label not in NOT_SPOTTED:
                    positives[label] = hop_probabilities(engine, [e for e in examples if e.labels[0] == label], label)[1]
            report[name] = calibrate_keywords(spec, post, name, neg, seconds / 3600, positives, target_per_hour, engine.speech_gate)
            thresholds[name] = {label: r["threshold"] for label, r in report[name]["classes"].items()}
        elif head.kind == TAGS and tags:
            examples = [e for text in tags for e in Source.parse(text, TAGS).read() if any(label in head.labels for label in e.labels)]
            examples, streams, _ = hop_probabilities(engine, examples, name)
            truth = np.array([[label in e.labels for label in head.labels] for e in examples])
            report[name] = calibrate_tags(spec, post, name, streams, truth)
            thresholds[name] = {label: r["threshold"] for label, r in report[name].items()}
    return thresholds, {"false_alarms_per_hour_target": target_per_hour, "post": asdict(post), "backend": backend.name, **report}


def calibrate(ckpt, out: Path, keywords: list[str], negatives: list[str], tags: list[str], target_per_hour: float = 1.0, post: PostConfig | None = None) -> dict:
    """Thresholds through torch fp32 into a copy of the checkpoint; the per-head report."""
    model = checkpoint.load_model(ckpt)
    thresholds, calibration = thresholds_of(TorchBackend(model, ckpt), keywords, negatives, tags, target_per_hour, post)
    model.spec = model.spec.with_thresholds(thresholds, calibration)  # a task's go into its TaskConfig
    checkpoint.save(out, model)
    return {name: r for name, r in calibration.items() if name in thresholds}


CPU_FILES = ("model.onnx", "model.int8.onnx")  # what ONNX Runtime runs; model.int8.qdq.onnx is TensorRT's input


def calibrate_files(folder: Path, measure: Callable[[Backend], tuple[dict, dict]]) -> dict[str, tuple[dict, dict]]:
    """Each CPU file of an export calibrated by `measure(backend) -> (thresholds, calibration)`
    through ONNX Runtime on that file, into its manifest.json entry; file -> what was recorded."""
    recorded = {}
    for name in CPU_FILES:
        if (Path(folder) / name).is_file():
            recorded[name] = measure(OnnxBackend(Path(folder) / name))
            record_thresholds(folder, name, *recorded[name])
    return recorded


def calibrate_export(folder: Path, keywords: list[str], negatives: list[str], tags: list[str], target_per_hour: float = 1.0,
                     post: PostConfig | None = None) -> dict:
    """`thresholds_of` for each ONNX file of an export; per file, the per-head report."""
    recorded = calibrate_files(folder, lambda backend: thresholds_of(backend, keywords, negatives, tags, target_per_hour, post))
    return {name: {head: r for head, r in calibration.items() if head in thresholds} for name, (thresholds, calibration) in recorded.items()}


def main(
    ckpt: str = typer.Option(None, help="The checkpoint to calibrate (through torch), or:"),
    export: Path = typer.Option(None, help="An export folder: each ONNX file calibrated through ONNX Runtime, into manifest.json."),
    out: Path = typer.Option(None, help="Where to write the calibrated copy of --ckpt."),
    keywords: list[str] = typer.Option([], help="Keyword clips (validation data), sources (train.data.Source)."),
    negatives: list[str] = typer.Option([], help="Audio without keywords: folders, files or sources."),
    tags: list[str] = typer.Option([], help="Tagged clips (validation data), sources."),
    false_alarms_per_hour: float = typer.Option(1.0),
) -> None:
    """Per-class thresholds measured through the streaming engine and the backend that runs the
    model, written into a copy of the checkpoint or into the export's manifest."""
    if (ckpt is None) == (export is None) or (ckpt is not None and out is None):
        print("train.calibrate: error: give --ckpt with --out, or --export", file=sys.stderr)
        raise typer.Exit(2)
    try:
        report = calibrate(ckpt, out, keywords, negatives, tags, false_alarms_per_hour) if ckpt else \
            calibrate_export(export, keywords, negatives, tags, false_alarms_per_hour)
    except (checkpoint.CheckpointError, BackendError, ValueError, FileNotFoundError) as e:
        print(f"train.calibrate: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    print(json.dumps(report, indent=1)[:4000])
    print(f"{out or export / 'manifest.json'}: thresholds written")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
