"""Keywords in running audio: long recordings of real background with keywords and other speech
mixed in, spotted the way `edgetag file` spots them.

    python -m train.running --model runs/default/calibrate/model.safetensors \\
        --keywords ../shared/data/speech_commands,split=val,percent=20 \\
        --others ../shared/data/fsdd,groups=60-100 --others ../shared/data/wake_words,groups=80-100 \\
        --backgrounds esc50:../shared/data/esc50,folds=4

A scene (`compose`) strings background clips end to end and drops a word into it every few
seconds: a keyword, or speech that holds none (digits, wake words, other words, other
languages), each at a random SNR over the background where it lands. The engine makes the
scene's hop probabilities once; the post-processor then replays them at any threshold, so a
whole recall / false-alarm curve costs one pass of the model. A spot that overlaps a keyword of
its label finds it (once); a spot of another label there is a wrong spot; any other spot is a
false alarm. Thresholds are chosen on one scene (`calibrate_threshold`) and reported on another
made of other speakers and other background.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import typer

from edgetag.spec import KEYWORDS, NOT_SPOTTED, TAGS, ModelSpec
from edgetag.stream import Engine, Event, PostConfig, process_blocks, speech_gated
from train.calibrate import GRID, head_processor, replay
from train.data import Example, Source, load_clips
from train.views import core as core_of, mix, power


@dataclass
class Placed:
    label: str  # a keyword, or "" for speech that holds none
    start: float  # seconds
    end: float
    core: tuple[float, float] | None = None  # the span of the clip that holds most of its energy (the word): train.refit labels hops by it


@dataclass
class Scene:
    audio: np.ndarray
    words: list[Placed]
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.rate

    @property
    def keywords(self) -> list[Placed]:
        return [w for w in self.words if w.label]


def compose(keywords: list[Example], others: list[Example], backgrounds: list[Example], rate: int = 16000, snr_db: tuple[float, float] = (0.0, 15.0),
            gap: tuple[float, float] = (1.0, 3.0), keyword_share: float = 0.5, repeat: int = 1, seed: int = 0, core: float = 0.9,
            arrangements: int = 1) -> Scene:
    """One scene: every readable background clip `repeat` times, each pass in another random
    order, end to end; then words (keywords with probability `keyword_share`, each clip used at
    most once) every `gap` seconds, until the words or the background run out. Each word's core
    is the span of its clip holding the middle `core` of its energy. With `arrangements` N, N such
    scenes of the same clips (seeds seed, seed + 1, ...: other orders, places and SNRs), end to
    end, the clips decoded once: a false-alarm rate over a few hundred words rests on a handful of
    alarms, and which words happen to land on which sound moves it as much as the model does."""
    beds = [x for x in load_clips(backgrounds, rate) if x is not None and len(x)]
    if not beds:
        raise ValueError("no readable background audio")
    spoken = {True: [(e.labels[0], x) for e, x in zip(keywords, load_clips(keywords, rate)) if x is not None and e.labels[0] not in NOT_SPOTTED],
              False: [("", x) for x in load_clips(others, rate) if x is not None]}

    def arrangement(seed: int) -> Scene:
        rng = np.random.default_rng(seed)
        audio = np.concatenate([beds[i] for _ in range(repeat) for i in rng.permutation(len(beds))]).astype(np.float32)
        pools = {kind: list(pool) for kind, pool in spoken.items()}  # each arrangement draws every clip again
        for pool in pools.values():
            rng.shuffle(pool)
        words, t = [], rng.uniform(*gap)
        while pools[True] or pools[False]:
            is_keyword = bool(pools[True]) and (not pools[False] or rng.random() < keyword_share)
            label, x = pools[is_keyword].pop()
            start = round(t * rate)
            if start + len(x) > len(audio):
                break
            bed = audio[start : start + len(x)]
            audio[start : start + len(x)] = mix(x, bed, rng.uniform(*snr_db)) if power(bed) > 1e-10 else x
            first, last = core_of(x, core)
            words.append(Placed(label, start / rate, (start + len(x)) / rate, ((start + first) / rate, (start + last) / rate)))
            t = words[-1].end + rng.uniform(*gap)
        peak = np.abs(audio).max()
        return Scene(audio / peak if peak > 1 else audio, words, rate)

    return joined([arrangement(seed + i) for i in range(arrangements)])


def joined(scenes: list[Scene]) -> Scene:
    """Scenes end to end, as one."""
    if len(scenes) == 1:
        return scenes[0]
    offsets = np.cumsum([0.0, *(s.seconds for s in scenes)])
    shift = lambda span, by: None if span is None else (span[0] + by, span[1] + by)  # noqa: E731
    words = [Placed(w.label, w.start + by, w.end + by, shift(w.core, by)) for s, by in zip(scenes, offsets) for w in s.words]
    return Scene(np.concatenate([s.audio for s in scenes]), words, scenes[0].rate)


def hop_probabilities(engine: Engine, scene: Scene, block_seconds: float = 10.0) -> dict[str, np.ndarray]:
    """head -> [hops, classes] of the scene through the streaming engine."""
    block = round(block_seconds * scene.rate)
    hops = process_blocks(engine, (scene.audio[i : i + block] for i in range(0, len(scene.audio), block))).hops
    engine.reset()
    return {name: np.stack([h.probabilities[name] for h in hops]) for name in engine.spec.heads}


def spot_thresholds(engine: Engine, head: str) -> dict[str, float]:
    """Per keyword, the threshold the engine spots it at: its calibrated one, else the default."""
    return {label: float(t) for label, t in zip(engine.spec.heads[head].labels, engine.post.on[head]) if label not in NOT_SPOTTED}


def score(spec: ModelSpec, post: PostConfig, head: str, probabilities: dict[str, np.ndarray], scene: Scene, threshold: float | dict[str, float],
          speech_gate: float = 0.0) -> dict:
    """Spots of one keyword head at `threshold` (one for all keywords, or per keyword), gated on
    the model's Speech tag at `speech_gate`: keywords found, wrong spots, false alarms (and per hour)."""
    labels = spec.heads[head].labels
    per = threshold if isinstance(threshold, dict) else {label: float(threshold) for label in labels if label not in NOT_SPOTTED}
    return tally(replay(spec, post, head, per, [probabilities], speech_gate)[0], scene)


def tally(events: list[Event], scene: Scene) -> dict:
    """What spots found in a scene: a spot that overlaps a keyword of its label finds it (once);
    one of another label there is a wrong spot; any other spot is a false alarm."""
    targets, found, wrong, alarms = scene.keywords, set(), 0, 0
    for e in events:
        near = [i for i, w in enumerate(targets) if e.start < w.end and e.end > w.start]
        hit = next((i for i in near if targets[i].label == e.label and i not in found), None)
        if hit is not None:
            found.add(hit)
        elif any(targets[i].label != e.label for i in near):
            wrong += 1
        elif not near:
            alarms += 1
    hours = scene.seconds / 3600
    return {"keywords": len(targets), "found": len(found), "recall": len(found) / max(1, len(targets)), "wrong_spots": wrong,
            "false_alarms": alarms, "false_alarms_per_hour": alarms / hours, "hours": hours}


def curve(spec: ModelSpec, post: PostConfig, head: str, probabilities: dict[str, np.ndarray], scene: Scene, speech_gate: float = 0.0) -> list[dict]:
    """Recall and false alarms per hour at every threshold of the grid (one for all keywords):
    `score` at each, from one sweep of the hops."""
    spots = head_processor(spec, post, head).sweep(head, speech_gated(spec, probabilities, speech_gate)[head], GRID)
    return [{"threshold": float(t), **tally(events, scene)} for t, events in zip(GRID, spots)]


def calibrate_threshold(points: list[dict], target_per_hour: float) -> dict:
    """The lowest threshold whose false alarms stay within the target (the curve's point)."""
    within = [p for p in points if p["false_alarms_per_hour"] <= target_per_hour]
    return min(within, key=lambda p: p["threshold"]) if within else max(points, key=lambda p: p["threshold"])


def best_within(points: list[dict], per_hour: float) -> dict | None:
    """The curve point with the most keywords found at no more than `per_hour` false alarms."""
    within = [p for p in points if p["false_alarms_per_hour"] <= per_hour]
    return max(within, key=lambda p: (p["recall"], -p["threshold"])) if within else None


def calibrate_spotting(spec: ModelSpec, post: PostConfig, head: str, probabilities: dict[str, np.ndarray], scene: Scene, gates: list[float],
                       target_per_hour: float, smoothings: list[float] = (0.0,)) -> tuple[tuple[float, float], dict, dict[tuple[float, float], list[dict]]]:
    """The speech gate, keyword smoothing (seconds) and threshold that spot the most keywords
    within the false-alarm target: each (gate, smoothing) pair's curve gives its threshold
    (`calibrate_threshold`), and a pair must spot more than a lower gate or less smoothing to be
    chosen. Where no pair keeps the target, the one closest to it (fewest false alarms) is
    chosen. Returns ((gate, smoothing), its point, every pair's curve)."""
    curves = {(gate, smoothing): curve(replace(spec, keyword_smoothing=smoothing), post, head, probabilities, scene, gate)
              for gate in sorted(gates) for smoothing in sorted(smoothings)}
    chosen = {pair: calibrate_threshold(points, target_per_hour) for pair, points in curves.items()}

    def merit(pair: tuple[float, float]) -> tuple:
        p = chosen[pair]
        within = p["false_alarms_per_hour"] <= target_per_hour
        return within, p["recall"] if within else -p["false_alarms_per_hour"], p["recall"], -pair[0], -pair[1]

    best = max(chosen, key=merit)
    return best, chosen[best], curves


def plot_curves(curves: dict[str, list[dict]], path: Path, title: str, marks: dict[str, dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, points in curves.items():
        line, = ax.plot([max(p["false_alarms_per_hour"], 0.1) for p in points], [100 * p["recall"] for p in points], label=name)
        if marks and name in marks:
            m = marks[name]
            ax.plot(max(m["false_alarms_per_hour"], 0.1), 100 * m["recall"], "o", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("false alarms per hour (0 drawn at 0.1)")
    ax.set_ylabel("keywords spotted (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scene_of(keywords: list[str], others: list[str], backgrounds: list[str], seed: int = 0, repeat: int = 1, snr_db: tuple[float, float] = (0.0, 15.0),
             core: float = 0.9, arrangements: int = 1) -> Scene:
    """A scene from sources (train.data.Source): keyword clips, other speech, background (`compose`)."""
    read = lambda sources, head: [e for text in sources for e in Source.parse(text, head).read()]  # noqa: E731
    return compose(read(keywords, KEYWORDS), read(others, KEYWORDS), read(backgrounds, TAGS), snr_db=snr_db, repeat=repeat, seed=seed, core=core,
                   arrangements=arrangements)


def heard(spec: ModelSpec, head: str, probabilities: dict[str, np.ndarray], scene: Scene, level: float) -> float:
    """Share of the scene's keywords whose own label reaches `level` in some hop whose window
    overlaps them: what any threshold up to `level` could spot, before false alarms and gates."""
    labels, p = list(spec.heads[head].labels), probabilities[head]
    starts = np.arange(len(p)) * spec.hop_seconds  # each hop's window, as the engine times it
    reached = [p[(starts < w.end) & (starts + spec.window_seconds > w.start), labels.index(w.label)].max(initial=0.0) >= level for w in scene.keywords]
    return float(np.mean(reached)) if reached else 0.0


def main(
    model: str = typer.Option(None, help="A checkpoint or export (default: the bundled model)."),
    keywords: list[str] = typer.Option(..., help="Keyword clips (sources, train.data.Source)."),
    others: list[str] = typer.Option([], help="Speech without keywords (sources)."),
    backgrounds: list[str] = typer.Option(..., help="Background sound the words are mixed into (sources)."),
    seed: int = typer.Option(0, help="Seed of the scene."),
    snr: tuple[float, float] = typer.Option((0.0, 15.0), help="Each word's level over the background where it lands, uniform in this range (dB)."),
    repeat: int = typer.Option(1, help="Passes of the background, each in another order (more words fit in)."),
    arrangements: int = typer.Option(1, help="Scenes of the same clips end to end (seeds --seed, --seed + 1, ...): false-alarm rates over more audio."),
    hop: float = typer.Option(None, help="Seconds between the windows (default: the model's own hop; a student listens at its calibrated one, not its training one)."),
    gates: list[float] = typer.Option([], "--gate", help="Also the curve with keywords gated on the model's Speech tag at this probability (repeatable; 0: never gated)."),
    plot: Path = typer.Option(None, help="PNG of the recall / false-alarm curve."),
) -> None:
    """Recall and false alarms per hour of keywords in running audio, at the model's thresholds and over a grid."""
    from edgetag.runtime import load_backend

    try:
        if not all(0 <= g < 1 for g in gates):
            raise ValueError(f"--gate: {', '.join(f'{g:g}' for g in gates)} are not all in [0, 1)")
        if not snr[0] <= snr[1]:  # NaN fails too
            raise ValueError(f"--snr: {snr[0]:g} {snr[1]:g} is not a range (low <= high)")
        if repeat < 1:
            raise ValueError(f"--repeat: {repeat} is not a number of passes (1 or more)")
        if arrangements < 1:
            raise ValueError(f"--arrangements: {arrangements} is not a number of scenes (1 or more)")
        if hop is not None and not hop > 0:
            raise ValueError(f"--hop: {hop:g} is not a positive number of seconds")
        post = PostConfig()
        engine = Engine(load_backend(model), post, hop=hop)
        scene = scene_of(keywords, others, backgrounds, seed, repeat, snr_db=snr, arrangements=arrangements)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.running: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    head, own = engine.spec.head_of(KEYWORDS), engine.speech_gate
    probabilities = hop_probabilities(engine, scene)
    at = score(engine.spec, post, head, probabilities, scene, spot_thresholds(engine, head), own)
    print(f"{scene.seconds / 60:.1f} min, {len(scene.keywords)} keywords, {len(scene.words) - len(scene.keywords)} other words")
    smoothed = f", keywords averaged over {engine.spec.keyword_smoothing:g} s" if engine.spec.keyword_smoothing else ""
    print(f"at the model's thresholds{f' and speech gate {own:g}' if own else ''}{smoothed}:", json.dumps(at))
    print("keywords whose own label reaches 0.5 / 0.9 in some hop over them: "
          f"{100 * heard(engine.spec, head, probabilities, scene, 0.5):.1f}% / {100 * heard(engine.spec, head, probabilities, scene, 0.9):.1f}%")
    curves = {"model": curve(engine.spec, post, head, probabilities, scene, own)}
    for gate in gates:
        if gate != own:
            curves[f"gated on Speech >= {gate:g}" if gate else "never gated"] = curve(engine.spec, post, head, probabilities, scene, gate)
    for name, points in curves.items():
        print(name)
        for p in points[::5]:
            print(f"  threshold {p['threshold']:.2f}: {100 * p['recall']:.1f}% spotted, {p['false_alarms_per_hour']:.1f} false alarms / hour")
        for per_hour in (4.0, 0.0):
            best = best_within(points, per_hour)
            print(f"  best within {per_hour:g} false alarms / hour: " + (f"{100 * best['recall']:.1f}% spotted at {best['threshold']:g}" if best else "none"))
    if plot:
        plot_curves(curves, plot, "keywords in running audio", {"model": at})


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
