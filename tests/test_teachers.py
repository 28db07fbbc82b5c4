"""The third-party teachers: their front ends against independent oracles, and the teachers
against the figures their references publish (skipped without ../shared/teachers)."""

import csv
import math

import numpy as np
import pytest
import torch

from tests.conftest import DATA, data_path, white_noise

TEACHERS = DATA.parent / "teachers"


def teacher_path(relative: str):
    path = TEACHERS / relative
    if not path.exists():
        pytest.skip(f"teacher weights not available: {path}")
    return path


def test_tf_stft_magnitude_is_the_dft_of_each_windowed_frame():
    from train.teachers import tf_stft_magnitude

    x = white_noise(0.1)
    got = tf_stft_magnitude(x, 480, 320, 512)
    assert got.shape == (1 + (len(x) - 480) // 320, 257)
    n, k = np.arange(480), np.arange(257)
    window = np.sin(np.pi * n / 480) ** 2  # periodic Hann
    for i in (0, len(got) - 1):
        frame = x[320 * i : 320 * i + 480] * window
        dft = np.exp(-2j * np.pi * np.outer(k, n) / 512) @ frame  # zero-padded at the end to 512
        np.testing.assert_allclose(got[i], np.abs(dft), rtol=1e-4, atol=1e-4)


def test_tf_mfcc_matrix_is_the_unnormalised_dct_scaled_by_rsqrt_2n():
    """Oracle: the DCT-II through an FFT of the mirrored sequence (Makhoul)."""
    from train.teachers import tf_mfcc_matrix

    x = np.random.default_rng(0).normal(size=(5, 40))
    spectrum = np.fft.fft(np.concatenate([x, x[:, ::-1]], axis=1))[:, :40]
    dct = np.real(np.exp(-1j * np.pi * np.arange(40) / 80) * spectrum)  # 2 sum x cos(pi k (2n+1) / 2N)
    np.testing.assert_allclose(x @ tf_mfcc_matrix(40), dct / math.sqrt(80), rtol=1e-5, atol=1e-5)


def test_tf_mel_matrix_triangles():
    from train.teachers import tf_mel_matrix

    w = tf_mel_matrix(40, 257, 16000, 20.0, 4000.0)
    assert w.shape == (257, 40)
    assert not w[0].any()  # the DC bin is left out
    assert not w[np.linspace(0, 8000, 257) > 4000].any()  # nothing above the upper edge
    assert (w.max(axis=0) > 0.5).all() and (w <= 1).all()  # every band reaches towards its peak
    centers = w.argmax(axis=0)
    assert (np.diff(centers) >= 0).all()  # bands rise with frequency


def test_mn04_front_end_matches_its_recipe_written_out():
    """AugmentMelSTFT (eval) written out in numpy: pre-emphasis, a centred reflect-padded STFT
    with an 800-sample symmetric Hann inside 1024, power, Kaldi mel banks, log, (x + 4.5) / 5."""
    from edgetag.features import mel_banks
    from train.teachers import AudioSetTeacher

    teacher = AudioSetTeacher.__new__(AudioSetTeacher)  # the front end alone: no weights needed
    teacher.mel, teacher.window = torch.tensor(mel_banks(128, 1024, 32000, 0.0, 15000.0).T), torch.hann_window(800, periodic=False)
    x = white_noise(0.5, rate=32000).astype(np.float64)
    got = teacher.features(torch.from_numpy(x.astype(np.float32)[None]))[0, 0].numpy()

    y = x[1:] - 0.97 * x[:-1]
    padded = np.pad(y, 512, mode="reflect")
    window = np.zeros(1024)
    window[112:912] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(800) / 799)
    frames = np.stack([padded[i : i + 1024] * window for i in range(0, len(padded) - 1024 + 1, 320)])
    power = np.abs(np.fft.rfft(frames)) ** 2  # [frames, 513]
    want = (np.log(power @ mel_banks(128, 1024, 32000, 0.0, 15000.0).astype(np.float64) + 1e-5) + 4.5) / 5
    assert got.shape == want.T.shape == (128, 1 + len(y) // 320)
    np.testing.assert_allclose(got, want.T, atol=2e-3)


def test_mlperf_keyword_teacher_reaches_its_published_accuracy():
    """The reference reaches 91-92% on the Speech Commands v2 test set; ../shared holds a
    speaker-disjoint part of that set. A front end off by a detail (magnitude vs power, the DCT
    scale, the peak normalisation) costs points here."""
    from edgetag.audio import load
    from train.teachers import KeywordTeacher

    pytest.importorskip("ai_edge_litert", reason="the TFLite teachers need ai-edge-litert (the train extra)")
    teacher = KeywordTeacher(teacher_path("mlperf_tiny_kws/kws_ref_model.tflite"))
    root = data_path("speech_commands")
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    x = np.stack([np.pad(a[:16000], (0, max(0, 16000 - len(a)))) for a in (load(root / r["path"]) for r in rows)])
    predicted = np.array(teacher.labels)[teacher(x).argmax(1)]
    accuracy = np.mean(predicted == np.array([r["label"] for r in rows]))
    assert accuracy >= 0.91, f"{accuracy:.3f} on {len(rows)} clips"


# The first clip of each category in the ESC-50 metadata here, with its AudioSet class.
@pytest.mark.parametrize("clip, expected", [
    ("4-183992-A-0.flac", "Dog"),
    ("4-164064-A-1.flac", "Chicken, rooster"),
    ("5-198411-E-20.flac", "Baby cry, infant cry"),
    ("4-102871-A-42.flac", "Siren"),
    ("2-103426-A-3.flac", "Cattle, bovinae"),
    ("4-125825-A-46.flac", "Church bell"),
])
def test_mn04_names_esc50_sounds_by_their_audioset_class(clip, expected):
    from edgetag.audio import load
    from train.teachers import AudioSetTeacher

    teacher = AudioSetTeacher(teacher_path("efficientat_mn04_as/mn04_as_mAP_432.pt"), data_path("audioset/class_labels_indices.csv"))
    p = teacher(load(data_path(f"esc50/audio/{clip}"))[None])[0]
    assert p.shape == (527,)
    top = [teacher.labels[i] for i in np.argsort(-p)[:5]]
    assert expected in top[:3], top
