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
MIN_RATE, MAX_RATE = 1000, 768000  # Hz: telephone-band recordings to DXD
# Float files may go a little over full scale (a mix's intersample peaks); far beyond it, the
# samples were never scaled to [-1, 1] (raw integers written as floats), and any answer is noise.
MAX_PEAK = 4.0


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
    if not MIN_RATE <= f.samplerate <= MAX_RATE:  # a 32 KB WAV claiming 1 Hz would resample to hours
        f.close()
        raise AudioError(path, f"sample rate {f.samplerate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
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
            if not np.isfinite(block).all():  # a float file holding NaN or infinity would poison every window after it
                at = seen + int(np.argmin(np.isfinite(block).all(axis=1)))
                raise AudioError(path, f"non-finite samples (NaN or infinity) at {at / f.samplerate:.2f} s")
            if len(block) and (peak := float(np.abs(block).max())) > MAX_PEAK:
                at = seen + int(np.argmax(np.abs(block).max(axis=1)))
                raise AudioError(path, f"samples reach {peak:.3g} times full scale at {at / f.samplerate:.2f} s (float audio must lie in [-1, 1])")
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


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif")


def expand(inputs: list[str]) -> tuple[list[str], list[AudioError]]:
    """Files from files, folders (searched recursively for audio) and glob patterns, in the
    order given, each once; an input that matches nothing becomes an AudioError instead."""
    import glob

    files, errors = [], []
    for item in inputs:  # os.walk does not follow symlinked folders either
        if os.path.isdir(item):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(item) for name in names if name.lower().endswith(AUDIO_SUFFIXES))
            files.extend(found) if found else errors.append(AudioError(item, "folder holds no audio files"))
        elif os.path.exists(item) or not glob.has_magic(item):
            files.append(item)  # a missing file fails when it is read, with its own reason
        else:
            found = _glob(item)
            files.extend(found) if found else errors.append(AudioError(item, "no file matches this pattern"))
    once = {}  # real path -> the first name it was given by
    for f in files:
        once.setdefault(os.path.realpath(f), f)
    return list(once.values()), errors


def _glob(pattern: str) -> list[str]:
    """The files a glob pattern matches, sorted. `**` does not descend into symlinked folders
    (pathlib's rule, unlike glob.glob's): a link back to a parent folder would otherwise list
    every file again for each pass through it, or never end."""
    import glob
    from pathlib import Path

    parts = Path(pattern).parts
    first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
    base = Path(*parts[:first]) if first else Path()
    return sorted(str(p) for p in base.glob(str(Path(*parts[first:]))) if p.is_file())


def load(path, rate: int = SAMPLE_RATE) -> np.ndarray:
    """The whole file as float32 mono samples in [-1, 1] at `rate`."""
    blocks = list(stream(path, rate))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


# ---------------------------------------------------------------------------------------------
# Live input


class MicrophoneError(Exception):
    """No usable input: PortAudio missing, no input device, or a device that will not open."""


def _sounddevice():
    try:
        import sounddevice
    except ImportError as e:
        raise MicrophoneError("the microphone needs sounddevice (an edgetag dependency): pip install sounddevice") from e
    except OSError as e:  # sounddevice imports, but cannot load the PortAudio library
        raise MicrophoneError("PortAudio library not found: install libportaudio2 (apt-get install libportaudio2)") from e
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    channels: int
    sample_rate: float
    default: bool


def input_devices() -> list[InputDevice]:
    sd = _sounddevice()
    default = sd.default.device[0]
    return [InputDevice(i, d["name"], d["max_input_channels"], d["default_samplerate"], i == default)
            for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


def find_device(spec: str | None) -> InputDevice:
    """The input device by index or by a case-insensitive name substring; None: the default."""
    devices = input_devices()
    if not devices:
        raise MicrophoneError("no audio input device found")
    if spec is None:
        return next((d for d in devices if d.default), devices[0])
    if spec.isdigit():
        match = [d for d in devices if d.index == int(spec)]
    else:
        match = [d for d in devices if spec.lower() in d.name.lower()]
    if not match:
        raise MicrophoneError(f"no input device matches {spec!r} (see `edgetag devices`)")
    return match[0]


class Microphone:
    """Blocks from an input device at its native rate, resampled to `rate` with soxr.

    The PortAudio callback only copies into a bounded queue, so it never blocks; input
    overflows (reported by PortAudio) and blocks dropped because the consumer fell behind are
    counted, never raised.
    """

    def __init__(self, device: str | None = None, rate: int = SAMPLE_RATE, block_seconds: float = 0.1, queue_seconds: float = 10.0):
        import queue

        import soxr

        self.sd = _sounddevice()
        self.device = find_device(device)
        self.native_rate = int(self.device.sample_rate)
        self.blocksize = max(1, int(block_seconds * self.native_rate))
        self.queue = queue.Queue(maxsize=max(1, round(queue_seconds / block_seconds)))  # int() made 0.3 / 0.1 two blocks
        self.resampler = None if self.native_rate == rate else soxr.ResampleStream(self.native_rate, rate, 1, dtype="float32")
        self.overflows = 0
        self.dropped = 0
        self.stream = None

    def _callback(self, data, frames, time_info, status) -> None:
        if status.input_overflow:
            self.overflows += 1
        try:
            self.queue.put_nowait(data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0].copy())
        except Exception:  # queue.Full: the consumer is behind; drop rather than block PortAudio
            self.dropped += 1

    def __enter__(self) -> Microphone:
        try:
            self.stream = self.sd.InputStream(device=self.device.index, samplerate=self.native_rate, channels=1,
                                              dtype="float32", blocksize=self.blocksize, callback=self._callback)
            self.stream.start()
        except Exception as e:
            raise MicrophoneError(f"cannot open input device {self.device.name!r} ({e})") from e
        return self

    def __exit__(self, *exc) -> None:
        if self.stream is not None:
            self.stream.stop()
            self.stream.close()

    def read(self, timeout: float = 1.0) -> np.ndarray | None:
        """The next block at `rate` (possibly empty while the resampler fills), or None after
        `timeout` seconds without input."""
        import queue

        try:
            block = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        return self.resampler.resample_chunk(block) if self.resampler is not None else block


def realtime(path, rate: int = SAMPLE_RATE, block_seconds: float = 0.1) -> Iterator[np.ndarray]:
    """A file's blocks, released no faster than real time (the live path, fed from a file)."""
    import time

    start, sent = time.perf_counter(), 0
    for big in stream(path, rate):
        for i in range(0, len(big), int(block_seconds * rate)):
            block = big[i : i + int(block_seconds * rate)]
            sent += len(block)
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield block
