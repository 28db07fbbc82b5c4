"""Kaldi parity of fbank() (log-mel and MFCC) and the streaming invariant of StreamingFbank."""

import math
from dataclasses import replace

import numpy as np
import pytest
from conftest import SIGNALS, sine_sweep, white_noise

from edgetag import audio
from edgetag.features import LOG_FLOOR, PRESETS, FbankConfig, StreamingFbank, fbank, normalize, preset

# One frame (400 samples), one frame and a bit, a partial second, 1 s, 10 s.
LENGTHS = [400, 561, 5000, 16000, 160000]


# ---------------------------------------------------------------------------------------------
# Oracle 1: transformers' ASTFeatureExtractor, whose numpy path reproduces torchaudio's
# kaldi.fbank for the AST recipe in float64: the same numbers to float32 rounding (measured: 1e-6).


@pytest.fixture(scope="module")
def ast_extractor():
    transformers = pytest.importorskip("transformers", reason="transformers is the AST feature oracle (pip install -e .[dev])")
    return transformers.ASTFeatureExtractor()


def ast_oracle(extractor, waveform: np.ndarray) -> np.ndarray:
    n = PRESETS["ast"].num_frames(len(waveform))
    return extractor._extract_fbank_features(waveform, max_length=n)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("signal", SIGNALS)
def test_ast_preset_matches_ast_feature_extractor(ast_extractor, signal, length):
    waveform = SIGNALS[signal](length / 16000)
    ours = fbank(waveform, PRESETS["ast"])
    assert ours.shape == (PRESETS["ast"].num_frames(length), 128)
    np.testing.assert_allclose(ours, ast_oracle(ast_extractor, waveform), atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_ast_preset_matches_ast_feature_extractor_on_real_clips(ast_extractor, real_clip):
    waveform = audio.load(real_clip)
    ours = fbank(waveform, PRESETS["ast"])
    np.testing.assert_allclose(ours, ast_oracle(ast_extractor, waveform), atol=1e-5, rtol=0)


def test_empty_mel_bins_sit_at_log_eps_like_torchaudio():
    # 128 bins on a 512-point FFT: the lowest triangles fall between FFT bins and are empty.
    feats = fbank(white_noise(1.0), PRESETS["ast"])
    empty = (feats == np.float32(math.log(LOG_FLOOR))).all(axis=0)
    assert 0 < empty.sum() < 128
    assert empty[:10].any() and not empty[-10:].any()  # only at the low end, where bins are narrow


@pytest.mark.parametrize("name", PRESETS)
def test_silence_is_finite(name):
    config = PRESETS[name]
    feats = fbank(np.zeros(16000, np.float32), config)
    assert np.isfinite(feats).all()
    if config.mfcc:  # every band at the floor: a flat log-mel, whose DCT is C0 alone
        np.testing.assert_allclose(feats[:, 0], math.log(LOG_FLOOR) * math.sqrt(config.n_mels), rtol=1e-5)
        np.testing.assert_allclose(feats[:, 1:], 0.0, atol=1e-4)
    else:
        np.testing.assert_allclose(feats, math.log(LOG_FLOOR), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Oracle 2: kaldi-native-fbank (float32 Kaldi), for configurations real Kaldi accepts.

try:
    import kaldi_native_fbank as _knf
except ImportError:  # only the tests that compare against it skip (streaming == offline and the rest still run)
    _knf = None


def oracle():
    """kaldi-native-fbank, or a skip of the one test that needs it."""
    if _knf is None:
        pytest.skip("kaldi-native-fbank is the Kaldi oracle (pip install -e .[dev])")
    return _knf


def knf_frames(computer, waveform, rate: int = 16000) -> np.ndarray:
    computer.accept_waveform(rate, waveform)
    computer.input_finished()
    n = computer.num_frames_ready
    return np.stack([computer.get_frame(i) for i in range(n)]) if n else np.zeros((0, 0), np.float32)


def knf_fbank(config: FbankConfig, waveform) -> np.ndarray:
    opts = oracle().FbankOptions()
    _frame_opts(opts.frame_opts, config)
    opts.mel_opts.num_bins = config.n_mels
    opts.mel_opts.low_freq, opts.mel_opts.high_freq = config.low_freq, config.high_freq
    opts.use_energy, opts.raw_energy, opts.energy_floor = config.use_energy, config.raw_energy, config.energy_floor
    opts.htk_compat, opts.use_power = config.htk_compat, config.use_power
    return knf_frames(oracle().OnlineFbank(opts), waveform, config.sample_rate)


def knf_mfcc(config: FbankConfig, waveform) -> np.ndarray:
    opts = oracle().MfccOptions()
    _frame_opts(opts.frame_opts, config)
    opts.mel_opts.num_bins = config.n_mels
    opts.num_ceps, opts.cepstral_lifter = config.n_ceps, config.cepstral_lifter
    opts.use_energy, opts.raw_energy, opts.energy_floor = config.use_energy, config.raw_energy, config.energy_floor
    opts.htk_compat = config.htk_compat
    return knf_frames(oracle().OnlineMfcc(opts), waveform, config.sample_rate)


def _frame_opts(frame_opts, config: FbankConfig) -> None:
    frame_opts.samp_freq = config.sample_rate
    frame_opts.frame_length_ms, frame_opts.frame_shift_ms = config.frame_length_ms, config.frame_shift_ms
    frame_opts.dither, frame_opts.preemph_coeff = config.dither, config.preemphasis
    frame_opts.remove_dc_offset, frame_opts.window_type = config.remove_dc_offset, config.window
    frame_opts.snip_edges, frame_opts.round_to_power_of_two = config.snip_edges, config.round_to_power_of_two


def audible(reference: np.ndarray, config: FbankConfig) -> np.ndarray:
    """Cells within ~70 dB of their frame's loudest band.

    kaldi-native-fbank runs its FFT in float32, which cannot resolve bands 90+ dB under a
    frame's peak (pure tones, or the empty top octave of upsampled 8 kHz audio); our float64
    FFT agrees with the float64 AST oracle there. Log-magnitude spans half the log-power range.
    """
    dynamic_range = 16.0 if config.use_power else 8.0
    return reference >= reference.max(axis=1, keepdims=True) - dynamic_range


KALDI_CONFIGS = {
    "povey-80": FbankConfig(window="povey", n_mels=80, remove_mean=False),
    "hamming-40-energy": FbankConfig(window="hamming", n_mels=40, use_energy=True),
    "rect-64-htk-energy": FbankConfig(window="rectangular", n_mels=64, use_energy=True, htk_compat=True, raw_energy=False),
    "hanning-80-no-snip": FbankConfig(n_mels=80, snip_edges=False),
    "blackman-23-8k": FbankConfig(window="blackman", n_mels=23, sample_rate=8000, high_freq=-200, preemphasis=0.0),
    "magnitude-30": FbankConfig(n_mels=30, use_power=False, remove_dc_offset=False, remove_mean=False),
}


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("signal", ["noise", "sweep", "silence"])
@pytest.mark.parametrize("name", KALDI_CONFIGS)
def test_fbank_matches_kaldi(name, signal, length):
    config = KALDI_CONFIGS[name]
    seconds, rate = length / 16000, config.sample_rate
    # The sweep stays under the top filter: a frame whose tone lies above it holds only leakage,
    # 100+ dB down, where the float32 oracle has nothing left to compare.
    waveform = sine_sweep(seconds, rate, top=0.45) if signal == "sweep" else SIGNALS[signal](seconds, rate=rate)
    ours, reference = fbank(waveform, config), knf_fbank(config, waveform)
    assert ours.shape[0] == reference.shape[0] == config.num_frames(len(waveform))
    mask = audible(reference, config)
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", KALDI_CONFIGS)
def test_fbank_matches_kaldi_on_real_clips(name, real_clip):
    config = KALDI_CONFIGS[name]
    waveform = audio.load(real_clip, config.sample_rate)
    ours, reference = fbank(waveform, config), knf_fbank(config, waveform)
    mask = audible(reference, config)
    assert mask.mean() > 0.5  # most of the spectrogram is compared
    np.testing.assert_allclose(ours[mask], reference[mask], atol=1e-3, rtol=0)


MFCC_CONFIGS = {
    "kaldi-default": FbankConfig(window="povey", n_mels=23, mfcc=True, use_energy=True, energy_floor=0.0, remove_mean=False),
    "no-energy-htk": FbankConfig(n_mels=40, mfcc=True, n_ceps=20, htk_compat=True),
    "energy-htk-no-lifter": FbankConfig(n_mels=40, mfcc=True, use_energy=True, htk_compat=True, cepstral_lifter=0.0),
    "mfcc-40": PRESETS["mfcc-40"],  # the compact MFCC-gram (Kaldi refuses mfcc-gram's empty low mel bins)
}


@pytest.mark.parametrize("signal", ["noise", "silence"])
@pytest.mark.parametrize("name", MFCC_CONFIGS)
def test_mfcc_matches_kaldi(name, signal):
    config = MFCC_CONFIGS[name]
    waveform = SIGNALS[signal](2.0)
    np.testing.assert_allclose(fbank(waveform, config), knf_mfcc(config, waveform), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", MFCC_CONFIGS)
def test_mfcc_matches_kaldi_on_real_clips(name, real_clip):
    config = MFCC_CONFIGS[name]
    waveform = audio.load(real_clip)
    np.testing.assert_allclose(fbank(waveform, config), knf_mfcc(config, waveform), atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------
# Streaming == offline


STREAM_CONFIGS = {
    "ast": PRESETS["ast"],
    "mae-ast": PRESETS["mae-ast"],
    "mfcc-energy": FbankConfig(n_mels=40, mfcc=True, use_energy=True),
    "energy-htk": FbankConfig(n_mels=64, use_energy=True, htk_compat=True),
    "mfcc-gram": PRESETS["mfcc-gram"],
}


def chunked(waveform: np.ndarray, sizes) -> list[np.ndarray]:
    chunks, start = [], 0
    for size in sizes:
        if start >= len(waveform):
            break
        chunks.append(waveform[start : start + size])
        start += size
    return chunks


def random_sizes(seed: int, high: int = 3000):
    rng = np.random.default_rng(seed)
    while True:
        yield int(rng.integers(0, high))  # zero-length pushes included


@pytest.mark.parametrize("chunk", [1, 160, 400, 1601, "random"])
@pytest.mark.parametrize("name", STREAM_CONFIGS)
def test_streaming_equals_offline_for_any_chunking(name, chunk):
    config = STREAM_CONFIGS[name]
    waveform = sine_sweep(1.3) + white_noise(1.3, seed=1) * 0.1
    sizes = random_sizes(seed=7) if chunk == "random" else iter(lambda: chunk, None)
    stream = StreamingFbank(config)
    outputs = [stream.push(c) for c in chunked(waveform, sizes)]
    for out in outputs:
        assert out.shape[1] == config.n_features and out.dtype == np.float32
    streamed, offline = np.concatenate(outputs), fbank(waveform, config)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-5, rtol=0)
    assert stream.num_frames == offline.shape[0] and stream.num_samples == len(waveform)


def test_streaming_on_real_clip_with_dc_offset(real_clip):
    # AST's whole-waveform mean removal cannot stream; the per-frame DC removal makes it moot.
    waveform = audio.load(real_clip) + np.float32(0.05)
    stream = StreamingFbank(PRESETS["ast"])
    streamed = np.concatenate([stream.push(c) for c in chunked(waveform, random_sizes(seed=3))])
    np.testing.assert_allclose(streamed, fbank(waveform, PRESETS["ast"]), atol=1e-5, rtol=0)


def test_streaming_returns_only_completed_frames_and_resets():
    stream = StreamingFbank(PRESETS["ast"])
    assert stream.push(np.zeros(399, np.float32)).shape == (0, 128)  # a frame needs 400 samples
    assert stream.push(np.zeros(1, np.float32)).shape == (1, 128)
    assert stream.push(np.zeros(159, np.float32)).shape == (0, 128)  # the next starts 160 later
    assert stream.push(np.zeros(1, np.float32)).shape == (1, 128)
    waveform = white_noise(0.5)
    stream.reset()
    assert stream.num_frames == 0
    np.testing.assert_array_equal(stream.push(waveform), fbank(waveform))


def test_streaming_refuses_what_cannot_stream():
    with pytest.raises(ValueError, match="snip_edges"):
        StreamingFbank(FbankConfig(snip_edges=False))
    with pytest.raises(ValueError, match="mean"):
        StreamingFbank(FbankConfig(remove_dc_offset=False, remove_mean=True))


# ---------------------------------------------------------------------------------------------
# Config and helpers


def test_config_round_trips_through_a_plain_dict():
    config = preset("mae-ast", n_mels=64, mfcc=True)
    assert FbankConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fbank options: colour"):
        FbankConfig.from_dict({**config.to_dict(), "colour": "blue"})


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(window="kaiser"), "window must be one of"),
        (dict(n_mels=3), "n_mels"),
        (dict(low_freq=9000.0), "low_freq"),
        (dict(frame_length_ms=0.01), "under two samples"),
        (dict(mfcc=True, n_ceps=200), "n_ceps"),
    ],
)
def test_config_rejects_nonsense(bad, match):
    with pytest.raises(ValueError, match=match):
        FbankConfig(**bad)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="ast, mae-ast"):
        preset("ssast")


def test_presets_differ_where_the_papers_do():
    ast, mae = PRESETS["ast"], PRESETS["mae-ast"]
    assert (ast.window, ast.htk_compat, ast.remove_mean) == ("hanning", True, True)
    assert (mae.window, mae.htk_compat, mae.remove_mean) == ("povey", False, False)
    waveform = white_noise(0.5)
    assert not np.allclose(fbank(waveform, ast), fbank(waveform, mae))


@pytest.mark.parametrize("snip_edges", [True, False])
def test_num_frames_predicts_fbank(snip_edges):
    config = replace(PRESETS["ast"], snip_edges=snip_edges)
    for n in [0, 1, 80, 399, 400, 401, 559, 560, 16000]:
        assert fbank(white_noise(n / 16000), config).shape == (config.num_frames(n), 128)


def test_normalize_gives_the_ast_target_statistics():
    config = replace(PRESETS["ast"], norm_mean=-3.0, norm_std=2.0)
    x = np.array([[-3.0, 1.0, -7.0]], np.float32)
    np.testing.assert_array_equal(normalize(x, config), [[0.0, 1.0, -1.0]])


def test_accepts_numpy_and_torch_and_rejects_integers():
    waveform = white_noise(0.2)
    assert fbank(waveform).dtype == np.float32
    np.testing.assert_array_equal(fbank(waveform), fbank(waveform[None, :]))
    torch = pytest.importorskip("torch")
    np.testing.assert_array_equal(fbank(waveform), fbank(torch.from_numpy(waveform)))
    with pytest.raises(TypeError, match="float"):
        fbank((waveform * 32767).astype(np.int16))
    with pytest.raises(ValueError, match="mono"):
        fbank(np.zeros((2, 1000), np.float32))
