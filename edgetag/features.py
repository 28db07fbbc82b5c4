"""Kaldi-compatible log-mel filterbanks and MFCCs (`FbankConfig.mfcc`), offline and streaming.

The recipe is the one of `torchaudio.compliance.kaldi.fbank`, which AST, SSAST and MAE-AST were
trained with, written in numpy so the runtime needs neither torch nor torchaudio. Every frame is
computed on its own from its samples, so `StreamingFbank` can cut the same frames out of audio
that arrives in pieces and give the very numbers `fbank()` gives on the whole signal.

Waveforms are float samples in [-1, 1] (as soundfile returns them), 1-D: numpy arrays, or
anything `np.asarray` takes (a CPU torch tensor). Features come back as float32 numpy arrays.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

import numpy as np

from edgetag.audio import SAMPLE_RATE

WINDOWS = ("hanning", "povey", "hamming", "rectangular", "blackman")
# Kaldi floors the mel energies at float32's machine epsilon before the log: silence gives
# log(eps) ~= -15.94, never -inf.
LOG_FLOOR = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class FbankConfig:
    """Every option that changes the features, saved as a plain dict in each checkpoint.

    Defaults are the AST/SSAST recipe (`PRESETS["ast"]`). Option names follow Kaldi's.
    """

    sample_rate: int = SAMPLE_RATE
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    n_mels: int = 128
    window: str = "hanning"
    blackman_coeff: float = 0.42
    preemphasis: float = 0.97
    dither: float = 0.0
    remove_dc_offset: bool = True  # per frame (Kaldi)
    remove_mean: bool = True  # of the whole waveform first (AST's data loader)
    round_to_power_of_two: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0 counts down from Nyquist (Kaldi)
    snip_edges: bool = True
    htk_compat: bool = False
    use_energy: bool = False
    raw_energy: bool = True
    energy_floor: float = 1.0
    use_power: bool = True
    # MFCC instead of log-mel: DCT-II of the log-mel, Kaldi conventions.
    mfcc: bool = False
    n_ceps: int = 13
    cepstral_lifter: float = 22.0
    # Normalisation applied by `normalize()`: (x - norm_mean) / (norm_scale * norm_std).
    # The AST family uses 2 * std on purpose (target std 0.5); defaults are AudioSet's stats.
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974
    norm_scale: float = 2.0

    def __post_init__(self):
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {', '.join(WINDOWS)}, not {self.window!r}")
        if self.sample_rate <= 0 or self.frame_shift <= 0 or self.frame_length <= 1:
            raise ValueError(
                f"frame of {self.frame_length_ms} ms every {self.frame_shift_ms} ms at "
                f"{self.sample_rate} Hz is under two samples"
            )
        if self.n_mels <= 3:
            raise ValueError(f"n_mels must be > 3, not {self.n_mels}")
        nyquist = self.sample_rate / 2
        high = self.high_freq if self.high_freq > 0 else nyquist + self.high_freq
        if not 0 <= self.low_freq < high <= nyquist:
            raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist} Hz, got {self.low_freq}, {high}")
        if self.mfcc and not 0 < self.n_ceps <= self.n_mels:
            raise ValueError(f"n_ceps must be in 1..n_mels={self.n_mels}, not {self.n_ceps}")
        if self.norm_std <= 0 or self.norm_scale <= 0:
            raise ValueError("norm_std and norm_scale must be positive")

    # Kaldi truncates the frame sizes to whole samples.
    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def fft_size(self) -> int:
        n = self.frame_length
        return 1 << (n - 1).bit_length() if self.round_to_power_of_two else n

    @property
    def n_features(self) -> int:
        return (self.n_ceps if self.mfcc else self.n_mels) + (self.use_energy and not self.mfcc)

    def num_frames(self, num_samples: int) -> int:
        """Frames `fbank()` makes from `num_samples` samples."""
        if self.snip_edges:
            return 0 if num_samples < self.frame_length else 1 + (num_samples - self.frame_length) // self.frame_shift
        return (num_samples + self.frame_shift // 2) // self.frame_shift

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FbankConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown fbank options: {', '.join(sorted(unknown))}")
        return cls(**d)


EFFICIENTAT_BANDS = 103  # of its 128 bands 0-15 kHz, those that end below 8 kHz
EFFICIENTAT_HIGH = 700.0 * math.expm1(1127.0 * math.log1p(15000.0 / 700.0) * (EFFICIENTAT_BANDS + 1) / 129 / 1127.0)  # their top edge, 7892 Hz

PRESETS = {
    # AST / SSAST data loaders: hanning window, htk_compat, waveform mean removed, AudioSet stats.
    "ast": FbankConfig(htk_compat=True),
    # MAE-AST's released code: torchaudio defaults (povey window, no htk_compat, no mean removal);
    # it normalises inside the model with running stats, which an importer writes into norm_*.
    "mae-ast": FbankConfig(window="povey", htk_compat=False, remove_mean=False),
    # MFCC-grams (Gauy & Finger 2021): as many coefficients as mel bins, C0 first as torchaudio
    # orders them, no liftering (Kaldi's sine lifter is meant for ~13 coefficients and turns
    # negative past 22). "mfcc-gram" is the paper's 128 from 128; "mfcc-40" a compact 40 from 40.
    # Their norm stats are those of 300 random 16 kHz clips of ../shared/data, as AST's are
    # AudioSet's (C0 dominates the spread; the token embedding rescales each coefficient).
    "mfcc-gram": FbankConfig(mfcc=True, n_ceps=128, cepstral_lifter=0.0, norm_mean=-0.73, norm_std=9.64),
    "mfcc-40": FbankConfig(mfcc=True, n_mels=40, n_ceps=40, cepstral_lifter=0.0, norm_mean=-1.35, norm_std=8.78),
    # EfficientAT's front end (32 kHz, 1024-point FFT of 800-sample symmetric Hann frames, 128
    # Kaldi mel bands 0-15 kHz, log(x + 1e-5), (x + 4.5) / 5) on 16 kHz audio: a 512-point FFT of
    # 400 samples has the same 31.25 Hz bins and 10 ms frames, so its first 103 bands are the
    # same triangles; the other 25 reach past 8 kHz, where 16 kHz audio holds nothing. A frame of
    # half the samples has a quarter of the power: log 4 moves into the mean. mn04 on these
    # features: 61.6% of ESC-50 fold 4 (47 classes), 69.4% on its own front end (upsampled).
    "efficientat": FbankConfig(n_mels=EFFICIENTAT_BANDS, remove_dc_offset=False, remove_mean=False, low_freq=0.0, high_freq=EFFICIENTAT_HIGH,
                               norm_mean=-4.5 - math.log(4.0), norm_std=5.0, norm_scale=1.0),
}


def preset(name: str, **overrides) -> FbankConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown fbank preset {name!r}; choose from {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Constant matrices, cached per configuration (callers only read them)


def _mel(freq):
    return 1127.0 * np.log1p(np.asarray(freq, dtype=np.float64) / 700.0)


@lru_cache(maxsize=32)
def mel_banks(n_mels: int, fft_size: int, sample_rate: int, low_freq: float, high_freq: float) -> np.ndarray:
    """Kaldi's triangular filters, equally spaced on the mel scale, as float32 [fft_size // 2 + 1, n_mels].

    With many bins on a short FFT some triangles fall between two FFT bins and are all zero;
    Kaldi refuses that, torchaudio accepts it and its log-mel sits at log(eps) there. So do we.
    """
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    mel_low, mel_high = _mel(low_freq), _mel(high)
    delta = (mel_high - mel_low) / (n_mels + 1)
    left = mel_low + delta * np.arange(n_mels)[:, None]  # [n_mels, 1]
    center, right = left + delta, left + 2 * delta
    # The Nyquist bin gets no weight, as in Kaldi.
    mel = _mel(sample_rate / fft_size * np.arange(fft_size // 2))[None, :]  # [1, fft_size // 2]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = np.maximum(0.0, np.minimum(up, down))
    banks = np.pad(banks, ((0, 0), (0, 1)))
    # C order: a streaming hop's [10, 257] @ [257, 128] product took 24 us on the transpose's
    # layout and 7 us on this one (one AMD EPYC core)
    return _frozen(np.ascontiguousarray(banks.T, dtype=np.float32))  # [fft_size // 2 + 1, n_mels]


@lru_cache(maxsize=32)
def _window(kind: str, length: int, blackman_coeff: float) -> np.ndarray:
    n = np.arange(length, dtype=np.float64)
    a = 2 * math.pi / (length - 1)
    if kind == "hanning":
        w = 0.5 - 0.5 * np.cos(a * n)
    elif kind == "povey":  # Kaldi's default: a hann window to the power 0.85
        w = (0.5 - 0.5 * np.cos(a * n)) ** 0.85
    elif kind == "hamming":
        w = 0.54 - 0.46 * np.cos(a * n)
    elif kind == "blackman":
        w = blackman_coeff - 0.5 * np.cos(a * n) + (0.5 - blackman_coeff) * np.cos(2 * a * n)
    else:  # rectangular
        w = np.ones(length)
    return _frozen(w)


@lru_cache(maxsize=32)
def _dct(n_mels: int, n_ceps: int, lifter: float) -> np.ndarray:
    """Kaldi's orthonormal DCT-II [n_mels, n_ceps], with the cepstral lifter folded in."""
    k = np.arange(n_ceps)[None, :]
    n = np.arange(n_mels)[:, None]
    dct = np.sqrt(2.0 / n_mels) * np.cos(math.pi / n_mels * (n + 0.5) * k)
    dct[:, 0] = np.sqrt(1.0 / n_mels)
    if lifter:
        dct = dct * (1.0 + 0.5 * lifter * np.sin(math.pi * np.arange(n_ceps) / lifter))
    return _frozen(dct)


def _frozen(x: np.ndarray) -> np.ndarray:
    x.flags.writeable = False  # cached and shared: a caller writing into it would change every later call
    return x


# ---------------------------------------------------------------------------------------------
# Features


def _as_waveform(waveform) -> np.ndarray:
    x = np.asarray(waveform)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"expected a mono waveform [samples], got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"expected float samples in [-1, 1], got {x.dtype}")
    # float64 inside: the weak bands of tonal sounds lie 100+ dB under the peak, below what a
    # float32 FFT resolves, and Kaldi-exactness is checked there too.
    return x.astype(np.float64)


def _frames(x: np.ndarray, config: FbankConfig) -> np.ndarray:
    """Cut a waveform into frames: [num_frames, frame_length] (a view of `x` when it can be)."""
    length, shift = config.frame_length, config.frame_shift
    n = config.num_frames(len(x))
    if n == 0:
        return np.zeros((0, length))
    if not config.snip_edges:
        # Kaldi reflects the signal at both ends so frames centre on multiples of the shift.
        pad = length // 2 - shift // 2
        rev = x[::-1]
        x = np.concatenate([rev[-pad:], x, rev] if pad > 0 else [x[-pad:], rev])
        while len(x) < (n - 1) * shift + length:  # only for signals shorter than a frame
            x = np.concatenate([x, x[::-1]])
    x = np.ascontiguousarray(x)
    # a view, no copy; np.ndarray over x's buffer rather than as_strided, whose 4.6 us per call
    # is a tenth of a 10-frame streaming hop
    return np.ndarray((n, length), x.dtype, x, 0, (shift * x.itemsize, x.itemsize))  # [n, length]


def _frame_features(frames: np.ndarray, config: FbankConfig) -> np.ndarray:
    """Log-mel (or MFCC) of each frame on its own: [n, frame_length] -> [n, n_features] float32.

    A streaming hop computes a handful of frames, so this keeps the number of numpy calls small:
    their fixed cost, not the arithmetic, is what a hop pays.
    """
    c = config
    if frames.shape[0] == 0:
        return np.zeros((0, c.n_features), np.float32)
    if c.dither:
        frames = frames + c.dither * np.random.standard_normal(frames.shape)
    if c.remove_dc_offset:  # the mean, without mean()'s wrapper: a hop pays per call
        frames = frames - np.add.reduce(frames, axis=1, keepdims=True) / c.frame_length
    if c.use_energy and c.raw_energy:
        log_energy = _log_energy(frames, c)
    if c.preemphasis:
        # x[i] - k * x[i - 1], with x[-1] = x[0] as Kaldi has it
        previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames - c.preemphasis * previous
    frames = frames * _window(c.window, c.frame_length, c.blackman_coeff)
    if c.use_energy and not c.raw_energy:
        log_energy = _log_energy(frames, c)
    spectrum = np.fft.rfft(frames, n=c.fft_size, axis=1)
    spectrum = np.square(spectrum.real) + np.square(spectrum.imag)  # power; complex abs() is slower
    if not c.use_power:
        spectrum = np.sqrt(spectrum)
    # Sums of non-negative terms lose nothing in float32, which halves the cost of this product.
    banks = mel_banks(c.n_mels, c.fft_size, c.sample_rate, c.low_freq, c.high_freq)
    feats = spectrum.astype(np.float32) @ banks  # [n, n_mels]
    np.log(np.maximum(feats, np.float32(LOG_FLOOR), out=feats), out=feats)
    if c.mfcc:
        feats = (feats.astype(np.float64) @ _dct(c.n_mels, c.n_ceps, c.cepstral_lifter)).astype(np.float32)  # [n, n_ceps]
        if c.use_energy:
            feats[:, 0] = log_energy
        if c.htk_compat:
            c0 = feats[:, :1] if c.use_energy else feats[:, :1] * np.float32(math.sqrt(2.0))
            feats = np.concatenate([feats[:, 1:], c0], axis=1)
    elif c.use_energy:
        energy = log_energy[:, None].astype(np.float32)
        feats = np.concatenate([feats, energy] if c.htk_compat else [energy, feats], axis=1)
    return feats


def _log_energy(frames: np.ndarray, config: FbankConfig) -> np.ndarray:
    log_energy = np.log(np.maximum(np.square(frames).sum(axis=1), LOG_FLOOR))
    if config.energy_floor:
        log_energy = np.maximum(log_energy, math.log(config.energy_floor))
    return log_energy


def fbank(waveform, config: FbankConfig = PRESETS["ast"]) -> np.ndarray:
    """Kaldi log-mel filterbank (or MFCC when `config.mfcc`): [num_frames, n_features] float32.

    Raw log values, not normalised: see `normalize()`.
    """
    x = _as_waveform(waveform)
    # A constant offset is cancelled by the per-frame DC removal anyway; subtracting the mean
    # only there keeps fbank() frame-local, so streaming gives the same numbers.
    if config.remove_mean and not config.remove_dc_offset:
        x = x - x.mean()
    return _frame_features(_frames(x, config), config)


def normalize(features, config: FbankConfig):
    """The AST-family normalisation: (x - mean) / (scale * std), in the array's own type and dtype
    (numpy here, torch tensors in training)."""
    return (features - config.norm_mean) / (config.norm_scale * config.norm_std)


def windows(features, frames: int, hop: int) -> np.ndarray:
    """[T, F] -> [n, frames, F] (a new float32 array): windows starting every `hop` frames until
    one reaches the end. A short tail is padded with the fbank of silence (the log floor), never
    with the mean, which would read as sound once normalised."""
    features = np.asarray(features, dtype=np.float32)
    T, F = features.shape
    n = 1 + max(0, -(-(T - frames) // hop))  # ceil division
    padded = np.full(((n - 1) * hop + frames, F), math.log(LOG_FLOOR), np.float32)
    padded[:T] = features
    return padded[hop * np.arange(n)[:, None] + np.arange(frames)]  # [n, frames, F]


class StreamingFbank:
    """Features of audio that arrives in pieces, equal to `fbank()` on the whole signal.

    `push(samples)` of any size returns only the frames it completed; the cost of a push
    grows with the new samples, since only the tail of one frame is kept between pushes.
    """

    def __init__(self, config: FbankConfig = PRESETS["ast"]):
        if not config.snip_edges:
            raise ValueError("streaming needs snip_edges=True: otherwise the last frames reflect the end of the signal")
        if config.remove_mean and not config.remove_dc_offset:
            raise ValueError("streaming cannot subtract the mean of a whole waveform; use remove_dc_offset=True")
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0)  # samples not yet consumed by a frame
        self.num_frames = 0  # frames returned since the last reset
        self.num_samples = 0  # samples pushed since the last reset

    def push(self, samples) -> np.ndarray:
        x = _as_waveform(samples)
        self.num_samples += len(x)
        pending = np.concatenate([self._pending, x])
        frames = _frames(pending, self.config)
        n = frames.shape[0]
        self._pending = pending[n * self.config.frame_shift :]
        self.num_frames += n
        return _frame_features(frames, self.config)
