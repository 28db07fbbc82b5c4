"""Decoding: every format and bit depth, resampling, block-wise streaming, clear failures."""

import numpy as np
import pytest
import soundfile as sf
from conftest import data_path, white_noise

from edgetag import audio
from edgetag.audio import AudioError


def tone(seconds: float, rate: int, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def dominant_frequency(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.argmax(spectrum) * rate / len(x)


# (format, subtype, max abs error of the round trip)
FORMATS = [
    ("WAV", "PCM_U8", 1 / 64),
    ("WAV", "PCM_16", 1e-4),
    ("WAV", "PCM_24", 1e-6),
    ("WAV", "PCM_32", 1e-7),
    ("WAV", "FLOAT", 0.0),
    ("FLAC", "PCM_16", 1e-4),
    ("FLAC", "PCM_24", 1e-6),
    ("OGG", "VORBIS", None),  # lossy: compared by pitch and level instead
]


@pytest.mark.parametrize("fmt, subtype, tolerance", FORMATS, ids=lambda v: str(v))
def test_formats_decode_to_float32_mono(tmp_path, fmt, subtype, tolerance):
    x = tone(1.0, 16000)
    path = tmp_path / f"clip.{fmt.lower()}"
    sf.write(path, x, 16000, format=fmt, subtype=subtype)
    y = audio.load(path)
    assert y.dtype == np.float32 and y.ndim == 1 and len(y) == len(x)
    if tolerance is None:
        assert abs(dominant_frequency(y, 16000) - 440) < 2
        assert abs(np.abs(y).max() - 0.5) < 0.05
    else:
        np.testing.assert_allclose(y, x, atol=tolerance)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_any_rate_is_resampled_keeping_pitch_and_length(tmp_path, rate):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(2.0, rate, freq=1000.0), rate, subtype="FLOAT")
    y = audio.load(path, 16000)
    assert abs(len(y) - 32000) <= 1
    assert abs(dominant_frequency(y, 16000) - 1000) < 1
    assert abs(np.abs(y[1000:-1000]).max() - 0.5) < 0.01


def test_channels_are_averaged(tmp_path):
    left, right = tone(1.0, 16000, 300.0), tone(1.0, 16000, 1200.0)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    np.testing.assert_allclose(audio.load(path), (left + right) / 2, atol=1e-7)


@pytest.mark.parametrize("rate", [16000, 44100])
def test_streamed_blocks_concatenate_to_the_loaded_file(tmp_path, rate):
    path = tmp_path / "long.flac"
    sf.write(path, np.tile(white_noise(1.0, rate), 7), rate)
    blocks = list(audio.stream(path, 16000, block_seconds=0.75))
    assert len(blocks) >= 9
    # one block (plus the resampler's flush) in memory, never the file
    assert max(len(b) for b in blocks) <= 1.1 * 0.75 * 16000
    np.testing.assert_array_equal(np.concatenate(blocks), audio.load(path))
    assert abs(sum(len(b) for b in blocks) - 7 * 16000) <= 1


def test_info_reads_the_header(tmp_path):
    path = tmp_path / "clip.wav"
    sf.write(path, tone(1.5, 22050, channels=2), 22050)
    info = audio.info(path)
    assert (info.sample_rate, info.channels, info.frames, info.format) == (22050, 2, 33075, "WAV")
    assert info.duration == pytest.approx(1.5)


def test_real_8khz_clip_is_upsampled():
    path = data_path("fsdd/recordings/0_george_10.flac")
    assert audio.info(path).sample_rate == 8000
    y = audio.load(path)
    assert abs(len(y) - 2 * audio.info(path).frames) <= 1 and np.abs(y).max() > 0.05


# ---------------------------------------------------------------------------------------------
# Failures: one exception type, naming the path and the reason


def write_truncated(path, fmt):
    sf.write(path, white_noise(1.0), 16000, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "missing": (lambda p: None, "no such file"),
    "directory": (lambda p: p.mkdir(), "is a directory"),
    "empty": (lambda p: p.write_bytes(b""), "empty file"),
    "zero-length": (lambda p: sf.write(p, np.zeros(0, np.float32), 16000, format="WAV"), "no audio samples"),
    "not-audio": (lambda p: p.write_text("this is a text file, not a song\n" * 20), "not readable as audio"),
    "truncated-wav": (lambda p: write_truncated(p, "WAV"), "truncated"),
    "truncated-flac": (lambda p: write_truncated(p, "FLAC"), "truncated"),
    "truncated-ogg": (lambda p: write_truncated(p, "OGG"), "truncated"),
    "garbage-after-header": (lambda p: p.write_bytes(b"fLaC" + bytes(range(256)) * 8), "not readable as audio"),
    "nan-float-wav": (lambda p: sf.write(p, np.where(np.arange(16000) == 12000, np.nan, white_noise(1.0)).astype(np.float32), 16000, subtype="FLOAT"),
                      "non-finite samples (NaN or infinity) at 0.75 s"),
    "inf-float-wav": (lambda p: sf.write(p, np.full(800, np.inf, np.float32), 16000, subtype="FLOAT"), "non-finite samples (NaN or infinity) at 0.00 s"),
    "rate-1-hz": (lambda p: sf.write(p, white_noise(1.0), 1, format="WAV"), "sample rate 1 Hz is outside"),
    "rate-2^30-hz": (lambda p: sf.write(p, white_noise(0.1), 2**30, format="WAV"), "sample rate 1073741824 Hz is outside"),
    "float-far-over-full-scale": (lambda p: sf.write(p, white_noise(1.0) * 488, 16000, subtype="FLOAT"), "times full scale at"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_audio_error_naming_path_and_reason(tmp_path, case):
    make, reason = BAD_FILES[case]
    path = tmp_path / f"{case}.wav"
    make(path)
    with pytest.raises(AudioError) as error:
        audio.load(path)
    assert error.value.path == str(path)
    assert str(error.value).startswith(f"{path}: ")
    assert reason in error.value.reason
    with pytest.raises(AudioError):
        next(audio.stream(path))
