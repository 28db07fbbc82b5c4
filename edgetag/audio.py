"""Decode audio files to float32 mono at the model rate, whole or block by block.

soundfile (libsndfile) reads WAV (8/16/24/32-bit PCM, float), FLAC, OGG/Vorbis and more; soxr
resamples. `load()` is the concatenation of `stream()`'s blocks, so a file read whole and a file
streamed give the same samples, and a long file streamed is never held in memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
BLOCK_SECONDS = 10.0


class AudioError(Exception):
    """An audio file that cannot be used; `str()` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class AudioInfo:
    path: str
    sample_rate: int
    channels: int
    frames: int
    format: str

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


# libsndfile accepts a WAV whose data chunk is cut short and says so only in its log, with
# "data : <header size> (should be <real size>)"; Ogg says the stream "ended unexpectedly".
_TRUNCATED = re.compile(r"^data\s*:\s*\d+ \(should be \d+\)|ended unexpectedly", re.MULTILINE)


def _open(path):
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file")
    try:
        f = sf.SoundFile(path)
    except Exception as e:  # libsndfile's message says why: "Format not recognised", ...
        raise AudioError(path, f"not readable as audio ({_reason(e)})") from e
    if _TRUNCATED.search(f.extra_info):
        f.close()
        raise AudioError(path, "truncated file (shorter than its header says)")
    if f.frames == 0:
        f.close()
        raise AudioError(path, "no audio samples")
    return f


def _reason(e: Exception) -> str:
    # LibsndfileError keeps libsndfile's own words ("Format not recognised.") in error_string.
    text = getattr(e, "error_string", "") or str(e) or type(e).__name__
    return text.removeprefix("Error : ").strip().rstrip(".")


def info(path) -> AudioInfo:
    """What the file holds, read from its header; raises AudioError like `load()`."""
    with _open(path) as f:
        return AudioInfo(os.fspath(path), f.samplerate, f.channels, f.frames, f.format)


def stream(path, rate: int = SAMPLE_RATE, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Yield float32 mono blocks at `rate`, about `block_seconds` of source audio each.

    Memory stays at one block whatever the file's length. Channels are averaged; other sample
    rates go through one streaming soxr resampler, so block edges leave no seams.
    """
    import soxr

    f = _open(path)
    with f:
        resampler = None if f.samplerate == rate else soxr.ResampleStream(f.samplerate, rate, 1, dtype="float32")
        blocksize = max(1, int(block_seconds * f.samplerate))
        seen = 0
        while True:
            try:
                block = f.read(blocksize, dtype="float32", always_2d=True)
            except Exception as e:
                raise AudioError(path, f"corrupt or truncated audio at {seen / f.samplerate:.2f} s ({_reason(e)})") from e
            last = len(block) < blocksize
            seen += len(block)
            mono = block.mean(axis=1, dtype=np.float32) if block.shape[1] > 1 else block[:, 0]
            if resampler is not None:
                mono = resampler.resample_chunk(mono, last=last)
            if len(mono):
                yield np.ascontiguousarray(mono, dtype=np.float32)
            if last:
                break
        if seen == 0:
            raise AudioError(path, "no audio samples")


def load(path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as float32 mono samples in [-1, 1] at `rate`."""
    blocks = list(stream(path, rate))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
