"""`edgetag listen`: blocks from a microphone (or a file in real time) through the engine, with a
rich live view or JSON lines, until the duration is up or Ctrl-C."""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from edgetag.audio import MicrophoneError
from edgetag.spec import EVENT_KINDS, KEYWORDS, TAGS
from edgetag.stream import Engine, Event, Hop

SILENCE_DBFS = -120.0


def dbfs(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0
    return 20 * np.log10(rms) if rms > 1e-6 else SILENCE_DBFS


@dataclass
class Session:
    """What a listening session saw: for the live view and the closing summary."""

    seconds: float = 0.0
    hops: int = 0
    skipped: int = 0  # hops the gate kept from the encoder
    level: float = SILENCE_DBFS  # of the latest block
    peak: float = SILENCE_DBFS
    events: list[Event] = field(default_factory=list)
    latest: Hop | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=500))

    def summary(self, overflows: int, dropped: int) -> dict:
        lat = sorted(self.latencies)
        return {
            "kind": "summary", "seconds": round(self.seconds, 2), "hops": self.hops, "skipped_hops": self.skipped, "events": len(self.events),
            "peak_dbfs": round(self.peak, 1), "overflows": overflows, "dropped_blocks": dropped,
            "hop_latency_ms_median": round(1000 * statistics.median(lat), 2) if lat else None,
            "hop_latency_ms_p95": round(1000 * lat[int(0.95 * (len(lat) - 1))], 2) if lat else None,
        }


def run(engine: Engine, blocks: Iterator[np.ndarray | None], duration: float | None, on_event: Callable[[Event, dict], None],
        on_update: Callable[[Session], None] = lambda s: None) -> Session:
    """Feed blocks (None means no audio arrived in time) into the engine until `duration`
    seconds of audio went through, the blocks end, or KeyboardInterrupt; events go to `on_event`
    with their wall-clock time."""
    session = Session()
    engine.reset()
    rate = engine.spec.fbank.sample_rate
    try:
        for block in blocks:
            if block is not None and len(block):
                if duration is not None:
                    block = block[: max(0, int(round((duration - session.seconds) * rate)))]
                session.seconds += len(block) / rate
                session.level = dbfs(block)
                session.peak = max(session.peak, session.level)
                for hop in engine.push(block):
                    _hop(session, hop, on_event)
                session.latencies.extend(engine.timings.per_hop)
                engine.timings.per_hop.clear()  # a session may run for days: keep only the recent window
            on_update(session)
            if duration is not None and session.seconds >= duration - 1e-9:
                break
    except KeyboardInterrupt:
        pass
    tail, closing = engine.flush()
    for hop in tail:
        _hop(session, hop, on_event)
    _emit(session, closing, on_event)
    on_update(session)
    return session


def _hop(session: Session, hop: Hop, on_event) -> None:
    session.hops += 1
    session.skipped += hop.skipped
    session.latest = hop
    _emit(session, hop.events, on_event)


def _emit(session: Session, events: list[Event], on_event) -> None:
    now = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
    for event in events:
        session.events.append(event)
        on_event(event, now)


def microphone_blocks(mic, stop_after_silence: float = 5.0) -> Iterator[np.ndarray | None]:
    """The microphone's blocks; None while none arrive. `stop_after_silence` s of nothing at all
    (not even silence: a device that went away, a sound server that died) is a MicrophoneError."""
    waited = 0.0
    while True:
        block = mic.read(timeout=0.5)
        waited = 0.0 if block is not None else waited + 0.5
        if waited >= stop_after_silence:
            raise MicrophoneError(f"{mic.device.name}: no audio for {stop_after_silence:g} s; the device went away")
        yield block


class View:
    """The rich live view: top tags with bars, recent keyword spots, input level, latency, drops."""

    def __init__(self, heads: dict, source: str, counters: Callable[[], tuple[int, int]], top: int = 6):
        self.heads, self.source, self.counters, self.top = heads, source, counters, top

    def __call__(self, session: Session):
        from rich.panel import Panel
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=24, no_wrap=True)
        grid.add_column(width=20, no_wrap=True)
        grid.add_column(width=5, justify="right")
        latest = session.latest
        for name, head in self.heads.items():
            if head.kind != TAGS or latest is None:
                continue
            p = latest.probabilities[name]
            for c in np.argsort(-p)[: self.top]:
                grid.add_row(head.labels[c], "█" * int(round(20 * p[c])), f"{p[c]:.2f}")
        spots = [e for e in session.events if e.kind == EVENT_KINDS[KEYWORDS]][-5:]
        keywords = "  ".join(f"[bold]{e.label}[/] {e.start:.1f}s ({e.score:.2f})" for e in reversed(spots)) or "-"
        level = max(0, int((session.level + 60) / 3))
        lat = sorted(session.latencies)
        median = f"{1000 * lat[len(lat) // 2]:.1f} ms" if lat else "-"
        overflows, dropped = self.counters()
        body = Table.grid()
        body.add_row(grid)
        body.add_row(f"keywords: {keywords}")
        body.add_row(f"level {session.level:6.1f} dBFS {'▮' * level}")
        body.add_row(f"{session.seconds:7.1f} s  hops {session.hops}  hop latency {median}  overflows {overflows}  dropped {dropped}")
        return Panel(body, title=f"edgetag listen: {self.source}", subtitle="Ctrl-C to stop")
