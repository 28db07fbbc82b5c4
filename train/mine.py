"""Hard negatives: windows of running audio that hold no keyword, where a model spots one.

    python -m train.mine --model runs/default-6/model.safetensors --out runs/mined \\
        --others ../shared/data/arabic_speech_commands,groups=0-40 \\
        --backgrounds esc50:../shared/data/esc50_other_folds

A scene of other speech (training speakers) over background sound (training sources) is
composed as train.running composes its scenes, without keywords, and run through the streaming
engine at the model's hop. Every stretch of hops where the keyword head gives some keyword at
least `level` would be a false alarm at any threshold up to it; the window of its most sure hop
is written as a clip, labelled `_unknown_` when it overlaps a word and `_silence_` when it holds
background alone, with a manifest beside the clips: a training source (`keywords=OUT`) for the
next student, which then hears the audio its predecessor was surest of wrongly (the bootstrapping
of hard-negative mining, as in keyword spotters trained on their own false alarms).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import typer

from edgetag.spec import KEYWORDS, SILENCE, UNKNOWN
from edgetag.stream import Engine
from train import running


def runs_over(score: np.ndarray, level: float) -> list[tuple[int, int]]:
    """[first, last) hop of every stretch of consecutive hops whose score reaches `level`."""
    above = np.concatenate([[False], score >= level, [False]])
    edges = np.flatnonzero(np.diff(above.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def mine(engine: Engine, scene: running.Scene, level: float, out: Path) -> dict:
    """Write the most sure window of every stretch of keyword spots at >= `level` in `scene`
    (which must hold no keyword) to `out`, with `out/manifest.csv`; returns what was found."""
    if scene.keywords:
        raise ValueError("the scene holds keywords: every spot in it must be a false alarm")
    spec, head = engine.spec, engine.spec.head_of(KEYWORDS)
    p = running.hop_probabilities(engine, scene)[head]  # [hops, classes]
    score = p[:, np.array(spec.heads[head].spotted)].max(1)  # the surest keyword of each hop
    samples = spec.window_samples
    step = spec.hop_frames * spec.fbank.frame_shift  # samples between hop windows
    words = np.array([(w.start, w.end) for w in scene.words]).reshape(-1, 2) * scene.rate
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for first, last in runs_over(score, level):
        hop = first + int(np.argmax(score[first:last]))
        start = hop * step
        window = scene.audio[start : start + samples]
        if len(window) < samples:  # the last hops of the stream run past the audio
            continue
        spoken = bool(((words[:, 0] < start + samples) & (words[:, 1] > start)).any())
        name = f"{len(rows):05d}.flac"
        sf.write(out / name, window, scene.rate)
        rows.append({"path": name, "label": UNKNOWN if spoken else SILENCE, "start_s": f"{start / scene.rate:.2f}", "score": f"{score[hop]:.4f}"})
    with open(out / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "start_s", "score"])
        writer.writeheader()
        writer.writerows(rows)
    over_words = sum(r["label"] == UNKNOWN for r in rows)
    return {"hours": scene.seconds / 3600, "words": len(scene.words), "hops": len(score), "level": level, "clips": len(rows),
            "over_words": over_words, "over_background": len(rows) - over_words}


def mine_sources(model: str, out: Path, others: list[str], backgrounds: list[str], level: float = 0.5, seed: int = 0, repeat: int = 1,
                 hop: float | None = None) -> dict:
    """`mine` on a scene of `others` (sources of speech without keywords) over `backgrounds`,
    through `model` (a checkpoint or export) at `hop` (default: its own)."""
    from edgetag.runtime import load_backend

    engine = Engine(load_backend(model), hop=hop)
    return mine(engine, running.scene_of([], others, backgrounds, seed, repeat), level, Path(out))


def main(
    model: str = typer.Option(..., help="The model whose false alarms are mined: a checkpoint or export."),
    out: Path = typer.Option(..., help="Folder for the clips and their manifest.csv (a keyword source)."),
    others: list[str] = typer.Option([], help="Speech without keywords (sources, train.data.Source); repeatable."),
    backgrounds: list[str] = typer.Option(..., help="Background sound the words are mixed into (sources); repeatable."),
    level: float = typer.Option(0.5, help="A keyword at least this sure in a hop is a false alarm to mine."),
    seed: int = typer.Option(0, help="Seed of the scene."),
    repeat: int = typer.Option(1, help="Passes of the background, each in another order (more words fit in)."),
    hop: float = typer.Option(None, help="Seconds between the windows (default: the model's own hop)."),
) -> None:
    """Write the windows of a keyword-free scene where the model spots a keyword, as training clips."""
    try:
        if not 0 < level < 1:
            raise ValueError(f"--level: {level:g} is not in (0, 1)")
        if repeat < 1:
            raise ValueError(f"--repeat: {repeat} is not a number of passes (1 or more)")
        if hop is not None and not hop > 0:
            raise ValueError(f"--hop: {hop:g} is not a positive number of seconds")
        found = mine_sources(model, out, others, backgrounds, level, seed, repeat, hop)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.mine: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    print(f"{found['hours']:.2f} h, {found['words']} words, {found['hops']} hops: {found['clips']} windows at >= {level:g} "
          f"({found['over_words']} over words, {found['over_background']} over background alone) -> {out / 'manifest.csv'}")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
