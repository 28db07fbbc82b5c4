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
    np.testing.assert_allclose(written, expected, rtol=1e-6, atol=1e-5)


def test_fbank_mfcc_is_the_dct_of_the_log_mel(tmp_path):
    """`--mfcc` writes the Kaldi DCT-II (orthonormal, cepstral lifter 22) of the log-mel, worked
    out here with numpy from the plain fbank the library computes, not by the library's MFCC
    (which test_features also checks against kaldi-native-fbank)."""
    out = tmp_path / "mfcc.npy"
    assert edgetag("fbank", EXAMPLE, "-o", out, "--mfcc").returncode == 0
    written = np.load(out)
    config = preset("ast", mfcc=True)
    log_mel = fbank(audio.load(EXAMPLE), preset("ast")).astype(np.float64)
    n, k = config.n_mels, np.arange(config.n_ceps)[:, None]
    dct = np.sqrt(2 / n) * np.cos(np.pi / n * (np.arange(n)[None, :] + 0.5) * k)
    dct[0] /= np.sqrt(2)
    lifter = 1 + 0.5 * config.cepstral_lifter * np.sin(np.pi * np.arange(config.n_ceps) / config.cepstral_lifter)
    ceps = log_mel @ dct.T * lifter
    assert config.htk_compat and not config.use_energy  # the AST preset: HTK order, C0 (x sqrt 2) last
    expected = np.concatenate([ceps[:, 1:], ceps[:, :1] * np.sqrt(2)], axis=1)
    assert written.shape == (698, 13)
    np.testing.assert_allclose(written, expected, rtol=1e-4, atol=1e-3)


def test_raw_fbank_of_a_resampled_file(tmp_path):
    """A 44.1 kHz file is resampled to 16 kHz before the fbank: the written features are those of
    the resampled audio (soxr, as `audio.load` does it), 98 frames for one second."""
    import soxr

    wav, out = tmp_path / "clip44k.wav", tmp_path / "f.npy"
    x = white_noise(1.0, 44100)
    sf.write(wav, x, 44100, subtype="FLOAT")
    assert edgetag("fbank", wav, "-o", out).returncode == 0
    expected = fbank(soxr.resample(x, 44100, 16000).astype(np.float32), preset("ast"))
    assert np.load(out).shape == (98, 128)
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-5, atol=1e-4)


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


def test_fbank_writes_exactly_the_path_given(tmp_path):
    """No .npy appended behind the user's back (np.save's habit), no temporary left beside it."""
    assert edgetag("fbank", EXAMPLE, "-o", tmp_path / "feats").returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["feats"] and np.load(tmp_path / "feats").shape == (698, 128)


def test_unwritable_output_is_a_user_error(tmp_path):
    result = edgetag("fbank", EXAMPLE, "-o", tmp_path / "no" / "such" / "dir" / "f.npy")
    assert result.returncode == 2 and "cannot write" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# The runtime needs no torch


NO_TORCH = """
import runpy, sys
sys.modules["torch"] = None  # an import of torch anywhere now fails
sys.argv = ["edgetag", *sys.argv[1:]]
try:
    runpy.run_module("edgetag", run_name="__main__")
finally:
    print("torch modules:", sorted(m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None), file=sys.stderr)
"""


@pytest.mark.parametrize("command", [["file", EXAMPLE, "--json"], ["listen", "--input", EXAMPLE, "--json", "--duration", "2"]])
def test_file_and_listen_run_the_bundled_model_without_torch(command):
    """The quick start's command and the live path on the bundled model never import torch: with
    torch made unimportable they still run, and no torch module was loaded."""
    run = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, command)], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "torch modules: []"
    rows = [__import__("json").loads(line) for line in run.stdout.splitlines()]
    assert rows and all(r["model"] == rows[0]["model"] for r in rows if "model" in r)
    if command[0] == "file":
        assert [r["label"] for r in rows if r["kind"] == "keyword"] == ["yes"]


def test_a_torch_backend_without_torch_says_how_to_get_it():
    run = subprocess.run([sys.executable, "-c", NO_TORCH, "file", str(EXAMPLE), "--backend", "torch"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[0] == "edgetag: error: the torch backends need torch: pip install 'edgetag[torch]' (or use the onnx backend)"


def test_bench_ends_with_its_summary_line_and_the_figures_agree():
    """`edgetag bench` (short settings): the summary line repeats the figures printed above it."""
    import re

    run = edgetag("bench", "--hours", "0.02", "--gate-minutes", "2", "--runs", "1", "--backend", "onnx", cwd=REPO)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    m = re.fullmatch(r"startup_s ([\d.]+) rss_mib (\d+) hop_ms ([\d.]+) fbank_hop_ratio ([\d.]+)x gate_saved ([\d.]+)%", last)
    assert m, last
    startup, rss, hop, ratio, saved = map(float, m.groups())
    assert f"{startup:.2f} s wall" in run.stdout and f"peak RSS {rss:.0f} MiB" in run.stdout
    assert 20 < rss < 1024 and 0 < hop and ratio > 1
    assert f"{ratio:.1f}x" in run.stdout and f"({saved:.1f}%)" in run.stdout
    assert re.search(r"slope [+-][\d.]+ MiB/h", run.stdout)



# ---------------------------------------------------------------------------------------------
# Many files at once: symlink loops, plots of one stem, long files (refusals: test_hostile.py)


def test_globs_do_not_follow_symlink_loops(tmp_path):
    """Two links back up the tree: a `**` pattern lists each file once, and ends."""
    (tmp_path / "d" / "e").mkdir(parents=True)
    sf.write(tmp_path / "d" / "e" / "x.wav", white_noise(0.5), 16000)
    (tmp_path / "d" / "self").symlink_to(tmp_path / "d")
    (tmp_path / "d" / "e" / "up").symlink_to(tmp_path / "d")
    result = edgetag("file", tmp_path / "d" / "**" / "*.wav", tmp_path / "d" / "e" / "x.wav", "--csv", timeout=60)
    assert result.returncode == 0, result.stderr
    assert {line.split(",")[0] for line in result.stdout.splitlines()[1:]} <= {str(tmp_path / "d" / "e" / "x.wav")}


def test_plots_of_files_with_one_stem_do_not_overwrite_each_other(tmp_path):
    pytest.importorskip("matplotlib")
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        sf.write(tmp_path / folder / "clip.wav", white_noise(0.5, seed=len(folder)), 16000)
    result = edgetag("file", tmp_path / "a" / "clip.wav", tmp_path / "b" / "clip.wav", "--plot", tmp_path / "p.png", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("p_*.png")) == ["p_clip.png", "p_clip_2.png"]


def test_plot_spectrogram_is_the_fbank_averaged_down_to_its_columns(tmp_path):
    """The plot reads the file block by block and averages the log-mel into at most `columns`
    columns: the offline fbank, averaged over the same groups of frames."""
    import math

    from edgetag import output

    path = tmp_path / "clip.wav"
    sf.write(path, white_noise(3.0, seed=4), 16000)
    full = fbank(audio.load(path), preset("ast"))
    got = output.spectrogram(path, preset("ast"), columns=50)
    group = math.ceil(len(full) / 50)
    np.testing.assert_allclose(got, [full[i : i + group].mean(0) for i in range(0, len(full), group)], atol=1e-5)
    assert len(got) <= 50


@pytest.mark.slow
def test_plotting_an_hour_stays_under_500_mib(tmp_path):
    """A 1-hour file (near-silence: a small FLAC that decodes to an hour) tagged and plotted."""
    pytest.importorskip("matplotlib")
    from edgetag.bench import peak_rss_mib

    path = tmp_path / "hour.flac"
    sf.write(path, (white_noise(3600.0, seed=1) * 1e-4).astype(np.float32), 16000, subtype="PCM_16")
    rss = peak_rss_mib([sys.executable, "-m", "edgetag", "file", str(path), "--plot", str(tmp_path / "hour.png"), "--json"])
    assert (tmp_path / "hour.png").stat().st_size > 0 and rss < 500
