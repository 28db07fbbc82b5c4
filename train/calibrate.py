"""Per-class thresholds for a checkpoint, measured through the streaming engine.

    python -m train.calibrate --ckpt runs/student/best.safetensors \\
        --keywords ../shared/data/speech_commands,split=val,percent=20 \\
        --negatives ../shared/data/background_noise --negatives esc50:../shared/data/esc50,folds=4 \\
        --tags esc50:../shared/data/esc50,folds=4 --out runs/student/calibrated.safetensors

Keywords: the lowest threshold per keyword that keeps its false alarms on audio without
keywords (the negatives, plus the `_unknown_`/`_silence_` clips of --keywords) at or below
--false-alarms-per-hour, counted as the engine counts spots (smoothing and refractory period
included). Tags: per class, the threshold with the best clip-level F1 on --tags (a clip is
positive when any window reaches it). The thresholds go into a copy of the checkpoint (under
"thresholds", which the engine reads) with the measured figures under "calibration".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import typer

from edgetag import checkpoint
from edgetag.runtime import TorchBackend
from edgetag.stream import SPECIAL_KEYWORDS, Engine, PostConfig
from train.data import Example, read_examples

GRID = np.round(np.arange(0.30, 1.0, 0.01), 2)


def hop_probabilities(engine: Engine, examples: list[Example], head: str) -> tuple[list[Example], list[np.ndarray]]:
    """The readable clips, and [hops, classes] for each, streamed through the engine."""
    from rich.progress import track

    from edgetag import audio
    from edgetag.stream import process_file

    kept, out = [], []
    for e in track(examples, description=f"{head} hops", transient=True):
        try:
            hops = process_file(engine, e.path)
        except audio.AudioError:
            continue
        kept.append(e)
        out.append(np.stack([h.probabilities[head] for h in hops if h.probabilities]))
    return kept, out


def smooth(p: np.ndarray, n: int) -> np.ndarray:
    """The engine's causal mean over the last n hops."""
    c = np.cumsum(np.vstack([np.zeros((1, p.shape[1])), p]), axis=0)
    k = np.arange(1, len(p) + 1)
    lo = np.maximum(0, k - n)
    return (c[k] - c[lo]) / (k - lo)[:, None]


def count_spots(p: np.ndarray, threshold: float, refractory: int) -> int:
    """Spots of one class in one stream: hops at or above threshold, a refractory gap apart
    (the other classes' spots are ignored: an upper bound on this class's alarms)."""
    count, last = 0, -(10**9)
    for k in np.flatnonzero(p >= threshold):
        if k - last >= refractory:
            count, last = count + 1, k
    return count


def calibrate_keywords(streams_neg: list[np.ndarray], streams_pos: dict[int, list[np.ndarray]], labels: list[str], hop: float,
                       post: PostConfig, target_per_hour: float) -> dict:
    smooth_hops = max(1, round(post.smoothing / hop))
    refractory = int(np.ceil(post.refractory / hop - 1e-9))
    hours = sum(len(s) for s in streams_neg) * hop / 3600
    neg = [smooth(s, smooth_hops) for s in streams_neg]
    result = {"negative_hours": hours, "classes": {}}
    for c, label in enumerate(labels):
        if label in SPECIAL_KEYWORDS:
            continue
        chosen = GRID[-1]
        for t in GRID:
            alarms = sum(count_spots(s[:, c], t, refractory) for s in neg)
            if alarms / hours <= target_per_hour:
                chosen = float(t)
                break
        alarms = sum(count_spots(s[:, c], chosen, refractory) for s in neg)
        pos = [smooth(s, smooth_hops) for s in streams_pos.get(c, [])]
        # a positive clip counts as detected when this keyword is the best spottable class at or above threshold
        spottable = np.array([label not in SPECIAL_KEYWORDS for label in labels])
        hits = sum(any(np.where(spottable, h, -1).argmax() == c and h[c] >= chosen for h in s) for s in pos)
        result["classes"][label] = {"threshold": chosen, "false_alarms": alarms, "false_alarms_per_hour": alarms / hours,
                                    "recall": hits / len(pos) if pos else None, "positives": len(pos)}
    return result


def calibrate_tags(streams: list[np.ndarray], truth: np.ndarray, labels: list[str]) -> dict:
    clip_max = np.stack([s.max(0) for s in streams])  # [clips, classes]
    out = {}
    for c, label in enumerate(labels):
        if not truth[:, c].any():
            continue
        f1 = []
        for t in GRID:
            pred = clip_max[:, c] >= t
            tp, fp, fn = (pred & truth[:, c]).sum(), (pred & ~truth[:, c]).sum(), (~pred & truth[:, c]).sum()
            f1.append(2 * tp / max(1, 2 * tp + fp + fn))
        best = int(np.argmax(f1))
        out[label] = {"threshold": float(GRID[best]), "f1": float(f1[best]), "positives": int(truth[:, c].sum())}
    return out


def calibrate(ckpt, out: Path, keywords: list[str], negatives: list[str], tags: list[str], target_per_hour: float = 1.0, post: PostConfig | None = None) -> dict:
    backend = TorchBackend(ckpt)
    post = post or PostConfig()
    engine = Engine(backend, post)
    thresholds, report = {}, {}
    for name, head in backend.heads.items():
        labels = list(head.labels)
        if head.kind == "keywords" and keywords:
            examples = [e for spec in keywords for e in read_examples(spec, "keywords") if e.labels[0] in labels]
            special = [e for e in examples if e.labels[0] in SPECIAL_KEYWORDS]
            _, neg = hop_probabilities(engine, special + [e for spec in negatives for e in negative_audio(spec)], name)
            pos = {}
            for e in examples:
                if e.labels[0] not in SPECIAL_KEYWORDS:
                    pos.setdefault(labels.index(e.labels[0]), []).append(e)
            pos_streams = {c: hop_probabilities(engine, es, name)[1] for c, es in pos.items()}
            report[name] = calibrate_keywords(neg, pos_streams, labels, engine.hop_seconds, post, target_per_hour)
            thresholds.update({label: r["threshold"] for label, r in report[name]["classes"].items()})
        elif head.kind == "tags" and tags:
            examples = [e for spec in tags for e in read_examples(spec, "tags") if any(label in labels for label in e.labels)]
            examples, streams = hop_probabilities(engine, examples, name)
            truth = np.array([[label in e.labels for label in labels] for e in examples])
            report[name] = calibrate_tags(streams, truth, labels)
            thresholds.update({label: r["threshold"] for label, r in report[name].items()})
    model = backend.model
    extra = {k: v for k, v in model.config.items() if k not in ("format", "encoder", "fbank", "heads")}
    extra.update(thresholds=thresholds, calibration={"false_alarms_per_hour_target": target_per_hour, "post": vars(post) | {"thresholds": {}}, **report})
    checkpoint.save(out, model, model.fbank, **extra)
    return report


def negative_audio(spec: str) -> list[Example]:
    """Audio without keywords: every audio file under a folder (or a file), or, for a source spec
    with a reader or options (`esc50:PATH,folds=4`, `PATH,split=val`), the clips it selects."""
    from train.data import READERS, find_audio

    if "," in spec or spec.split(":", 1)[0] in READERS:
        return read_examples(spec, "tags")
    return [Example(str(p), ()) for p in find_audio([spec])]


def main(
    ckpt: str = typer.Option(..., help="The checkpoint to calibrate."),
    out: Path = typer.Option(..., help="Where to write the calibrated copy."),
    keywords: list[str] = typer.Option([], help="Keyword clips (validation data), source specs."),
    negatives: list[str] = typer.Option([], help="Audio without keywords: folders, files or source specs."),
    tags: list[str] = typer.Option([], help="Tagged clips (validation data), source specs."),
    false_alarms_per_hour: float = typer.Option(1.0),
) -> None:
    report = calibrate(ckpt, out, keywords, negatives, tags, false_alarms_per_hour)
    print(json.dumps(report, indent=1)[:4000])
    print(f"{out}: thresholds written")


if __name__ == "__main__":
    typer.run(main)
