"""The `edgetag` command as users run it: a real subprocess, real exit codes, real stderr."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, white_noise
from edgetag import audio
from edgetag.features import fbank, normalize, preset

EXAMPLE = REPO / "edgetag" / "assets" / "example.flac"


def edgetag(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetag", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_version_and_help():
    from edgetag import __version__

    result = edgetag("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgetag {__version__}"
    result = edgetag("--help")
    assert result.returncode == 0 and "fbank" in result.stdout


@pytest.mark.parametrize("name", ["ast", "mae-ast"])
@pytest.mark.parametrize("normalized", [False, True])
def test_fbank_writes_what_the_library_computes(tmp_path, name, normalized):
    out = tmp_path / "feats.npy"
    result = edgetag("fbank", EXAMPLE, "-o", out, "--preset", name, *(["--normalize"] if normalized else []))
    assert result.returncode == 0, result.stderr
    written = np.load(out)
    config = preset(name)
    expected = fbank(audio.load(EXAMPLE), config)
    expected = normalize(expected, config) if normalized else expected
    assert written.dtype == np.float32 and written.shape == (698, 128)
    # another process may split the mel matmul over threads differently: equal to float rounding
    np.testing.assert_allclose(written, expected.numpy(), rtol=1e-6, atol=1e-5)


def test_fbank_mfcc(tmp_path):
    out = tmp_path / "mfcc.npy"
    assert edgetag("fbank", EXAMPLE, "-o", out, "--mfcc").returncode == 0
    assert np.load(out).shape == (698, 13)


def test_raw_fbank_of_a_resampled_file(tmp_path):
    wav, out = tmp_path / "clip44k.wav", tmp_path / "f.npy"
    sf.write(wav, white_noise(1.0, 44100), 44100)
    assert edgetag("fbank", wav, "-o", out).returncode == 0
    assert np.load(out).shape == (98, 128)


@pytest.mark.parametrize(
    "setup, reason",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_text("not audio"), "not readable as audio"),
        (lambda p: p.write_bytes(b""), "empty file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, setup, reason):
    path = tmp_path / "bad.wav"
    setup(path)
    result = edgetag("fbank", path, "-o", tmp_path / "out.npy")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith(f"edgetag: error: {path}: ") and reason in result.stderr
    assert not (tmp_path / "out.npy").exists()


def test_unwritable_output_is_a_user_error(tmp_path):
    result = edgetag("fbank", EXAMPLE, "-o", tmp_path / "no" / "such" / "dir" / "f.npy")
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("option, reason", [
    (["--hop", "0.125"], "a hop of 0.125 s is not a whole number of 10 ms frames (12.5 of them)"),
    (["--hop", "0"], "a hop of 0 s is shorter than one 10 ms frame"),
    (["--window", "0.05"], "a window of 0.05 s makes 3 frames, fewer than one token (16 frames)"),
    (["--window", "2", "--backend", "onnx"], "the onnx model takes 1 s windows only (its input length is fixed)"),
    (["--classes", "Doggo"], "classes: the model has no class 'Doggo'"),
])
def test_a_window_or_hop_the_model_cannot_take_is_one_line_and_exit_2(option, reason):
    """Never rounded to the nearest frame, never the model's own instead."""
    if "onnx" in option:
        pytest.importorskip("onnxruntime", reason="the bundled ONNX export needs onnxruntime (pip install 'edgetag[deploy]')")
    result = edgetag("file", EXAMPLE, *option)
    assert result.returncode == 2 and result.stderr.strip() == f"edgetag: error: {reason}"
