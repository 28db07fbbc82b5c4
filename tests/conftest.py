"""Shared fixtures: real audio from ../shared/data when present, synthetic signals always."""

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__import__("os").environ.get("EDGETAG_DATA", REPO.parent / "shared" / "data"))

# A few real clips of every kind: speech (16 kHz), environmental sounds, office sounds, and
# 8 kHz digits for the resampling path.
REAL_CLIPS = [
    "speech_commands/yes/0bac8a71_nohash_0.flac",
    "speech_commands/_silence_/1037.flac",
    "esc50/audio/4-183992-A-0.flac",
    "dcase2016_task2/sound/clearthroat002.flac",
    "fsdd/recordings/0_george_10.flac",
]


def make_spec(encoder="nano", heads=None, fbank=None, stream=None, **fields):
    """A ModelSpec for tests: a named size or an EncoderConfig, heads {name: labels} (the name is
    the kind), the AST fbank unless given, stream (window, hop) in seconds."""
    from edgetag.features import preset
    from edgetag.spec import EncoderConfig, HeadConfig, ModelSpec, StreamConfig

    encoder = EncoderConfig.named(encoder) if isinstance(encoder, str) else encoder
    heads = {name: h if isinstance(h, HeadConfig) else HeadConfig(name, h) for name, h in (heads or {}).items()}
    return ModelSpec(encoder, fbank or preset("ast"), heads, StreamConfig(*stream) if stream else StreamConfig(), **fields)


def make_model(encoder="nano", heads=None, **spec):
    from edgetag.model import AudioTransformer

    return AudioTransformer(make_spec(encoder, heads, **spec))


def data_path(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"real audio not available: {path} (set EDGETAG_DATA to the shared data folder)")
    return path


EXAMPLE = "example"  # the bundled example (edgetag/assets): real audio every checkout has


def assert_streaming_equals_offline(model_path: Path) -> None:
    """Per hop, for the bundled example pushed in blocks of random sizes (as a microphone
    delivers them), the engine's probabilities are the offline windows' of every head."""
    from edgetag import audio
    from edgetag.features import fbank, windows
    from edgetag.runtime import clip_probabilities, load_backend
    from edgetag.stream import Engine, process_blocks

    backend = load_backend(model_path)
    x = audio.load(REPO / "edgetag" / "assets" / "example.flac")
    sizes = np.random.default_rng(0).integers(1, 5000, 1000)
    edges = np.cumsum(sizes)[np.cumsum(sizes) < len(x)]
    hops = process_blocks(Engine(backend), np.split(x, edges)).hops
    feats = fbank(x, backend.spec.fbank)
    assert len(hops) == len(windows(feats, backend.spec.window_frames, backend.spec.hop_frames)) > 20
    expected = clip_probabilities(backend, [feats])[0]
    for name in backend.spec.heads:
        np.testing.assert_allclose(np.stack([h.probabilities[name] for h in hops]), expected[name], atol=1e-5)


@pytest.fixture(params=[EXAMPLE, *REAL_CLIPS], ids=lambda p: p.split("/")[0])
def real_clip(request) -> Path:
    return REPO / "edgetag" / "assets" / "example.flac" if request.param == EXAMPLE else data_path(request.param)


def white_noise(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * rate)) * 0.1).astype(np.float32)


def sine_sweep(seconds: float, rate: int = 16000, f0: float = 50.0, top: float = 0.49) -> np.ndarray:
    """A linear chirp from f0 to `top` times the sample rate."""
    f1 = top * rate
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))).astype(np.float32)


SIGNALS = {
    "noise": white_noise,
    "sweep": sine_sweep,
    "silence": lambda seconds, rate=16000: np.zeros(int(seconds * rate), np.float32),
}


def make_dataset(root: Path, clips: int = 16, seconds: float = 0.6, silence: bool = False) -> Path:
    """Easy classes in a folder per class: a steady tone, white noise, and optionally near-silence."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    for i in range(clips):
        kinds = {"tone": 0.3 * np.sin(2 * np.pi * rng.uniform(400, 3000) * t), "noise": 0.1 * rng.standard_normal(len(t))}
        if silence:
            kinds["silence"] = 1e-4 * rng.standard_normal(len(t))
        for label, x in kinds.items():
            (root / label).mkdir(parents=True, exist_ok=True)
            sf.write(root / label / f"{i:02d}.wav", x.astype(np.float32), 16000)
    return root


def pytest_terminal_summary(terminalreporter):
    """What was skipped and why, one line per reason, so a skipped module cannot pass for one test."""
    from collections import Counter

    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    reasons = Counter((r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)).removeprefix("Skipped: ") for r in skipped)
    terminalreporter.write_sep("-", f"{len(skipped)} skipped, by reason")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:5d}  {reason}")
