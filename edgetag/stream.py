"""The streaming core shared by files and the microphone.

audio chunks of any size -> StreamingFbank -> frames kept until no window needs them -> every
hop, one encoder pass over the last `window` frames serving every head -> post-processing ->
events. Windows start every hop at frame 0, hop, 2 hop, ...; at the end of the stream, one last
window padded with silence covers the tail (exactly `features.windows()` over the whole file).
Windows that are ready together run as one batch, so a file pushed in 10 s blocks is batched
and a microphone pushed in 100 ms blocks runs hop by hop, through the same code: results do
not depend on the block size.

An optional energy gate (`GateConfig`) skips the encoder on windows whose loudest frame stays
near the noise floor: such a hop reports zero probabilities and costs only its fbank. A model's
speech gate (`ModelSpec.speech_gate`, `speech_gated`) is another thing: it keeps its keywords
from being spotted in hops where its own Speech tag is low.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from edgetag.features import FbankConfig, StreamingFbank, windows
from edgetag.spec import EVENT_KINDS, KEYWORDS, TAGS, ModelSpec

DEFAULT_ON = {TAGS: 0.5, KEYWORDS: 0.7}  # for classes without a calibrated threshold


@dataclass
class PostConfig:
    """Post-processing, in seconds and probabilities; converted to hops once (`PostProcessor`).
    `tag_on`/`keyword_on` left at None use the model's calibrated per-class thresholds
    (`ModelSpec.thresholds`, else `DEFAULT_ON`); a value overrides them for every class of its
    kind."""

    tag_on: float | None = None  # a tag starts when its smoothed probability reaches this
    tag_off: float = 0.35  # and ends when it falls below this (hysteresis)
    keyword_on: float | None = None
    smoothing: float | None = None  # every head's mean over the hops of this many seconds (causal; 0: none); None: the model's (ModelSpec.keyword_smoothing)
    min_duration: float = 0.0  # shorter tag events are dropped
    refractory: float = 1.0  # after a keyword spot, no other spot for this long
    speech_gate: float | None = None  # keywords only where the Speech tag reaches this; None: the model's (ModelSpec.speech_gate); 0: never gated
    fold: bool = True  # drop a tag event while a more specific one (its head's `parents`) is on throughout
    classes: tuple[str, ...] = ()  # only these labels become events; empty: all


def speech_gated(spec: ModelSpec, probabilities: dict[str, np.ndarray], gate: float, tasks: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The probabilities the post-processor spots from: the model's own keyword heads at zero in
    the hops (a hop's [classes], or a stream's [hops, classes]) where its Speech tag is under
    `gate`. Words need speech; the heads of `tasks` are left as they are."""
    if not gate:
        return probabilities
    head, column = spec.speech_tag
    speech = probabilities[head][..., column : column + 1] >= gate
    return {name: p * speech if spec.heads[name].kind == KEYWORDS and name not in tasks else p for name, p in probabilities.items()}


@dataclass
class Event:
    kind: str  # "tag" or "keyword" (model.EVENT_KINDS)
    label: str
    start: float  # seconds from the start of the stream
    end: float
    score: float
    task: str = ""  # the model's task that made it (ModelSpec.tasks); empty: its own heads

    def to_dict(self) -> dict:
        return {"kind": self.kind, "label": self.label, "start": round(self.start, 3), "end": round(self.end, 3), "score": round(self.score, 4),
                **({"task": self.task} if self.task else {})}


@dataclass
class Hop:
    """One window's result: where it lies, what the heads said, what events ended in it."""

    index: int
    start: float
    end: float
    probabilities: dict[str, np.ndarray]  # zeros where the gate skipped the window
    events: list[Event]
    skipped: bool = False


class PostProcessor:
    """Smoothing, per-class thresholds with hysteresis and minimum duration for tags, and a
    refractory period for keywords. Causal: a hop's events depend on that hop and earlier ones.
    Smoothing is a mean over the nearest whole number of hops (at least one) to its seconds: the
    user's for every head, or else the model's own for its keyword heads (not a task's).
    One tag event per continuous activity at any hop: a class that comes back on while the
    window of its last on-hop still overlaps goes on as the same event, so a tag is reported once
    no later window can overlap it (at most one window after it ended).
    `thresholds` (head -> label -> on) replaces the spec's calibrated ones: calibration replays
    hops through here with the thresholds it tries (math.inf: never). The events of the heads
    named in `tasks` (a backend's `tasks`) say which task made them."""

    def __init__(self, spec: ModelSpec, post: PostConfig, thresholds: dict[str, dict[str, float]] | None = None, tasks: Collection[str] = ()):
        self.heads, self.post, self.hop, self.window = spec.heads, post, spec.hop_seconds, spec.window_seconds
        self.task = {name: name if name in tasks else "" for name in self.heads}
        own = {name: spec.keyword_smoothing if h.kind == KEYWORDS and name not in tasks else 0.0 for name, h in self.heads.items()}
        self.smooth = {name: max(1, round((own[name] if post.smoothing is None else post.smoothing) / self.hop)) for name in self.heads}
        self.min_hops = math.ceil(max(0.0, post.min_duration - self.window) / self.hop - 1e-9) + 1  # events last (hops - 1) * hop + window
        self.refractory = math.ceil(post.refractory / self.hop - 1e-9)
        user = {TAGS: post.tag_on, KEYWORDS: post.keyword_on}  # None: not set
        if thresholds is None:  # a threshold the user set wins over the model's calibrated ones
            thresholds = {name: t for name, t in spec.thresholds.items() if name in self.heads and user[self.heads[name].kind] is None}
        default = {kind: DEFAULT_ON[kind] if value is None else value for kind, value in user.items()}
        self.on = {name: np.array([thresholds.get(name, {}).get(label, default[h.kind]) for label in h.labels]) for name, h in self.heads.items()}
        self.off = {name: np.minimum(on, post.tag_off) for name, on in self.on.items()}
        unknown = set(post.classes) - {label for h in self.heads.values() for label in h.labels}
        if unknown:
            raise ValueError(f"classes: the model has no class {', '.join(map(repr, sorted(unknown)))}")
        reported = {name: np.array([not post.classes or label in post.classes for label in h.labels]) for name, h in self.heads.items()}
        self.spotted = {name: np.array(h.spotted) & reported[name] for name, h in self.heads.items()}
        # Per tag class, the classes that fold it away: those more specific than it.
        self.narrower = {name: [[d for d, up in enumerate(h.ancestors()) if c in up] if post.fold else [] for c in range(len(h.labels))]
                         for name, h in self.heads.items()}
        self.reset()

    def reset(self) -> None:
        self.history = {name: deque(maxlen=self.smooth[name]) for name in self.heads}
        self.active = {name: {} for name in self.heads}  # class -> [first hop, peak score, hops no narrower class was on]
        self.ended = {name: {} for name in self.heads}  # class -> (first hop, last hop, peak, alone): off, not yet reported
        self.last_spot = dict.fromkeys(self.heads, -(10**9))  # per keyword head: a task's keywords keep their own refractory period

    def _tag_event(self, head: str, label: str, first: int, last: int, peak: float, alone: int) -> Event | None:
        if last - first + 1 < self.min_hops or not alone:
            return None
        return Event(EVENT_KINDS[TAGS], label, first * self.hop, last * self.hop + self.window, peak, self.task[head])

    def _spot(self, head: str, k: int, c: int, score: float) -> Event:
        """Keyword class c of `head` spotted at hop k: the event covers that hop's window."""
        return Event(EVENT_KINDS[KEYWORDS], self.heads[head].labels[c], k * self.hop, k * self.hop + self.window, score, self.task[head])

    def update(self, k: int, probabilities: dict[str, np.ndarray]) -> list[Event]:
        events = []
        for name, head in self.heads.items():
            self.history[name].append(probabilities[name])
            p = np.mean(self.history[name], axis=0)
            if head.kind == TAGS:
                active, ended = self.active[name], self.ended[name]
                # an ended activity is reported once no later window can overlap its audio
                for c in [c for c, (_, last, _, _) in ended.items() if k * self.hop >= last * self.hop + self.window]:
                    if (event := self._tag_event(name, head.labels[c], *ended.pop(c))) is not None:
                        events.append(event)
                for c in map(int, np.flatnonzero((p >= self.on[name]) & self.spotted[name])):
                    if c not in active:  # back on while its last window still overlaps: the same activity goes on
                        first, _, peak, alone = ended.pop(c, (k, None, 0.0, 0))
                        active[c] = [first, peak, alone]
                for c in [c for c in active if p[c] < self.off[name][c]]:
                    first, peak, alone = active.pop(c)
                    ended[c] = (first, k - 1, peak, alone)
                for c, state in active.items():
                    state[1] = max(state[1], float(p[c]))
                    state[2] += not any(d in active for d in self.narrower[name][c])
            else:
                scores = np.where(self.spotted[name], p, -1.0)
                c = int(scores.argmax())
                if scores[c] >= self.on[name][c] and k - self.last_spot[name] >= self.refractory:
                    self.last_spot[name] = k
                    events.append(self._spot(name, k, c, float(scores[c])))
        return events

    def sweep(self, name: str, probabilities: np.ndarray, thresholds) -> list[list[Event]]:
        """The spots one keyword head makes over a whole stream ([hops, classes], from hop 0) at
        each of `thresholds` (one for every class it spots), as `replay` makes them at each: the
        smoothed hops are computed once, so a threshold costs only the hops that reach it."""
        n = self.smooth[name]
        if self.heads[name].kind != KEYWORDS:
            raise ValueError(f"sweep: {name!r} is not a keyword head")
        best = np.empty(len(probabilities), np.int64)
        score = np.empty(len(probabilities))
        for k in range(len(probabilities)):
            p = np.mean(probabilities[max(0, k - n + 1) : k + 1], axis=0)  # what `update`'s history holds at hop k
            scores = np.where(self.spotted[name], p, -1.0)
            best[k] = scores.argmax()
            score[k] = scores[best[k]]
        out = []
        for t in thresholds:
            events, last = [], -(10**9)
            for k in map(int, np.flatnonzero(score >= t)):
                if k - last >= self.refractory:
                    last = k
                    events.append(self._spot(name, k, int(best[k]), float(score[k])))
            out.append(events)
        return out

    def flush(self, last_hop: int, duration: float) -> list[Event]:
        """Close the tags still on, or ended but not yet reported, at the end of the stream (their
        end clipped to the audio)."""
        events = []
        for name, head in self.heads.items():
            closing = self.ended[name] | {c: (first, last_hop, peak, alone) for c, (first, peak, alone) in self.active[name].items()}
            for c, state in sorted(closing.items()):
                if (event := self._tag_event(name, head.labels[c], *state)) is not None:
                    event.end = min(event.end, duration)
                    events.append(event)
            self.active[name], self.ended[name] = {}, {}
        return events

    def replay(self, probabilities: dict[str, np.ndarray]) -> list[Event]:
        """The events of one whole stream of hop probabilities (head -> [hops, classes]), as the
        engine would make them; the post-processor is reset before and after."""
        self.reset()
        hops = len(next(iter(probabilities.values())))
        events = [e for k in range(hops) for e in self.update(k, {name: p[k] for name, p in probabilities.items()})]
        events += self.flush(hops - 1, (hops - 1) * self.hop + self.window)
        self.reset()
        return events


@dataclass(frozen=True)
class GateConfig:
    """Skip the encoder on a window whose loudest frame is under the noise floor + `margin_db`.

    A frame's level is its total mel power in dB; the noise floor before a window is the
    `percentile`th level of the frames in the `floor_seconds` of audio up to the window's end, so
    it follows the room, not the events (a steady sound longer than most of `floor_seconds`
    becomes the floor). No window is skipped before `warmup_seconds` of audio, when the floor is
    not known yet. Every decision reads only frames up to the window's end: block sizes do not
    change it, and a file gates as the microphone does."""

    margin_db: float = 10.0
    floor_seconds: float = 30.0
    percentile: float = 10.0
    warmup_seconds: float = 5.0

    def __post_init__(self):
        if not (self.margin_db > 0 and self.floor_seconds > 0 and 0 <= self.percentile < 100 and self.warmup_seconds >= 0):
            raise ValueError(f"gate: need margin_db > 0, floor_seconds > 0, 0 <= percentile < 100, warmup_seconds >= 0 (got {self})")


class Gate:
    """The gate's state: frame levels over the last `floor_seconds` before the next window's end."""

    def __init__(self, config: GateConfig, fbank: FbankConfig):
        if fbank.mfcc:
            raise ValueError("the gate reads log-mel frames; this model's features are MFCCs")
        self.config = config
        frames_per_second = fbank.sample_rate / fbank.frame_shift
        self.horizon = max(1, round(config.floor_seconds * frames_per_second))
        self.warmup = round(config.warmup_seconds * frames_per_second)
        # the mel columns: an energy column, when there is one, comes last (HTK) or first (Kaldi)
        start = int(fbank.use_energy and not fbank.htk_compat)
        self.mels = slice(start, start + fbank.n_mels)
        self.reset()

    def reset(self) -> None:
        self.levels = np.zeros(0)  # dB, of frames from index self.offset on
        self.offset = 0

    def push(self, frames: np.ndarray) -> None:
        x = frames[:, self.mels].astype(np.float64)
        peak = x.max(axis=1, keepdims=True) if len(x) else np.zeros((0, 1))
        total = peak[:, 0] + np.log(np.exp(x - peak).sum(axis=1))  # log of the mel power, overflow-free
        self.levels = np.concatenate([self.levels, 10 / np.log(10) * total])

    def opens(self, start: int, end: int) -> bool:
        """Whether the window of frames [start, end) may hold an event."""
        if end <= self.warmup:
            return True
        history = self.levels[max(0, end - self.horizon) - self.offset : end - self.offset]
        floor = np.percentile(history, self.config.percentile)
        return bool(self.levels[start - self.offset : end - self.offset].max() >= floor + self.config.margin_db)

    def forget(self, next_end: int) -> None:
        """Drop the levels no window ending at `next_end` or later reads."""
        drop = max(0, next_end - self.horizon - self.offset)
        self.levels, self.offset = self.levels[drop:], self.offset + drop


@dataclass
class Timings:
    """Seconds spent per stage since the last reset, and the hops they served."""

    fbank: float = 0.0
    encoder: float = 0.0
    post: float = 0.0
    hops: int = 0
    skipped: int = 0  # hops the gate kept from the encoder
    per_hop: list[float] = field(default_factory=list)  # latency of each hop (its share of a batch)


class Engine:
    """The streaming state: push audio (at the model's sample rate), get the hops it completed.

    `window`/`hop` (seconds) override the model's own; a model with a fixed input length (an
    ONNX export, a TensorRT engine) takes its own window only. `gate` skips quiet windows."""

    def __init__(self, backend, post: PostConfig | None = None, window: float | None = None, hop: float | None = None, batch_size: int = 64,
                 gate: GateConfig | None = None):
        self.backend = backend
        self.spec = backend.spec.with_stream(window, hop)
        if not self.spec.outputs:
            raise ValueError(f"{backend.source}: no heads to answer with (a pretrained encoder: fine-tune it first, python -m train.finetune --init it)")
        if backend.fixed_window and self.spec.window_frames != backend.spec.window_frames:
            raise ValueError(f"the {backend.name} model takes {backend.spec.stream.window:g} s windows only (its input length is fixed)")
        post = post or PostConfig()
        self.post = PostProcessor(self.spec, post, tasks=backend.tasks)
        self.speech_gate = self.spec.speech_gate if post.speech_gate is None else post.speech_gate
        if self.speech_gate and self.spec.speech_tag is None:
            raise ValueError(f"speech_gate {self.speech_gate:g}: the model has no Speech tag to gate its keywords on")
        self.batch_size = batch_size
        self.gate = Gate(gate, self.spec.fbank) if gate is not None else None
        self.reset()

    def reset(self) -> None:
        if self.gate is not None:
            self.gate.reset()
        self.fbank = StreamingFbank(self.spec.fbank)
        self.frames = np.zeros((0, self.spec.fbank.n_features), np.float32)  # frames from index self.offset on
        self.offset = 0
        self.next_hop = 0
        self.post.reset()
        self.timings = Timings()

    @property
    def seconds(self) -> float:
        return self.fbank.num_samples / self.spec.fbank.sample_rate

    def _opens(self, k: int, end: int) -> bool:
        return self.gate is None or self.gate.opens(k * self.spec.hop_frames, end)

    def _run(self, starts: list[int], batch: np.ndarray, fbank_seconds: float, opened: list[bool]) -> list[Hop]:
        t0 = time.perf_counter()
        run = np.flatnonzero(opened)
        probs = {name: np.zeros((len(starts), len(h.labels)), np.float32) for name, h in self.spec.heads.items()}
        if len(run):
            for name, p in self.backend(batch[run], self.batch_size).items():
                probs[name][run] = p
        t1 = time.perf_counter()
        hop, window = self.spec.hop_seconds, self.spec.window_seconds
        hops = []
        for j, k in enumerate(starts):
            p = {name: x[j] for name, x in probs.items()}
            events = self.post.update(k, speech_gated(self.spec, p, self.speech_gate, self.backend.tasks))
            hops.append(Hop(k, k * hop, k * hop + window, p, events, not opened[j]))
        t2 = time.perf_counter()
        t = self.timings
        t.fbank, t.encoder, t.post, t.hops = t.fbank + fbank_seconds, t.encoder + t1 - t0, t.post + t2 - t1, t.hops + len(starts)
        t.skipped += len(starts) - len(run)
        t.per_hop.extend([(fbank_seconds + t2 - t0) / len(starts)] * len(starts))
        return hops

    def push(self, samples) -> list[Hop]:
        t0 = time.perf_counter()
        new = self.fbank.push(samples)
        self.frames = np.concatenate([self.frames, new]) if len(new) else self.frames
        if self.gate is not None:
            self.gate.push(new)
        fbank_seconds = time.perf_counter() - t0
        total, hop, window = self.offset + len(self.frames), self.spec.hop_frames, self.spec.window_frames
        starts = []
        while self.next_hop * hop + window <= total:
            starts.append(self.next_hop)
            self.next_hop += 1
        if not starts:
            self.timings.fbank += fbank_seconds
            return []
        batch = np.stack([self.frames[k * hop - self.offset :][:window] for k in starts])
        opened = [self._opens(k, k * hop + window) for k in starts]
        drop = self.next_hop * hop - self.offset  # no later window needs these frames
        self.frames, self.offset = self.frames[drop:], self.offset + drop
        if self.gate is not None:
            self.gate.forget(self.next_hop * hop + window)
        return self._run(starts, batch, fbank_seconds, opened)

    def flush(self) -> tuple[list[Hop], list[Event]]:
        """End of stream: the padded window over the tail (when the last window missed it), and
        the tags still on, closed at the end of the audio. Call `reset()` before the next stream."""
        total, hop, window = self.offset + len(self.frames), self.spec.hop_frames, self.spec.window_frames
        hops = []
        if total and (self.next_hop == 0 or (self.next_hop - 1) * hop + window < total):
            k = self.next_hop
            hops = self._run([k], windows(self.frames[k * hop - self.offset :], window, window)[:1], 0.0, [self._opens(k, total)])
            self.next_hop += 1
        return hops, self.post.flush(self.next_hop - 1, self.seconds)


@dataclass
class Result:
    """A whole stream: its hops, then every event in the order the engine made them."""

    hops: list[Hop]
    events: list[Event]
    seconds: float


def process_blocks(engine: Engine, blocks) -> Result:
    """A whole stream through the engine from a fresh start: every block pushed, then flushed."""
    engine.reset()
    hops = [hop for block in blocks for hop in engine.push(block)]
    tail, closing = engine.flush()
    hops.extend(tail)
    return Result(hops, [e for hop in hops for e in hop.events] + closing, engine.seconds)


def process_file(engine: Engine, path, block_seconds: float = 10.0) -> Result:
    """Stream a file through the engine block by block (memory stays bounded for long files).
    A file shorter than one fbank frame is an AudioError: there is nothing to tag."""
    from edgetag import audio

    result = process_blocks(engine, audio.stream(path, engine.spec.fbank.sample_rate, block_seconds))
    if engine.fbank.num_frames == 0:
        raise audio.AudioError(path, f"{engine.seconds * 1000:.1f} ms of audio, shorter than one {engine.spec.fbank.frame_length_ms:g} ms frame: nothing to tag")
    return result
