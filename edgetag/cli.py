"""The `edgetag` command: a thin Typer layer over the library.

Each option maps onto one library argument. User mistakes (a missing or corrupt file, a bad
option value) end as one line `edgetag: error: <what>: <reason>` on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Streaming audio tagging and keyword spotting on the edge.",
)

EXIT_BAD_INPUT = 2


def fail(message: str) -> None:
    """Print one error line and exit 2."""
    print(f"edgetag: error: {message}", file=sys.stderr)
    raise typer.Exit(EXIT_BAD_INPUT)


def _version(value: bool) -> None:
    if value:
        from edgetag import __version__

        print(f"edgetag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    pass


class Preset(str, Enum):
    ast = "ast"
    mae_ast = "mae-ast"


@app.command()
def fbank(
    path: Path = typer.Argument(..., help="Audio file (WAV, FLAC, OGG, ...), any rate and channel count."),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the float32 [frames, bins] .npy array."),
    preset: Preset = typer.Option(Preset.ast, help="Feature recipe: 'ast' (AST/SSAST) or 'mae-ast'."),
    mfcc: bool = typer.Option(False, "--mfcc", help="MFCCs (Kaldi DCT of the log-mel) instead of the log-mel."),
    normalize: bool = typer.Option(False, "--normalize", help="Apply the model normalisation (x - mean) / (2 std)."),
) -> None:
    """Write the Kaldi-compatible log-mel filterbank of a file, for parity checks."""
    import numpy as np

    from edgetag import audio, features

    config = features.preset(preset.value, mfcc=mfcc)
    try:
        waveform = audio.load(path, config.sample_rate)
    except audio.AudioError as e:
        fail(str(e))
    feats = features.fbank(waveform, config)
    if normalize:
        feats = features.normalize(feats, config)
    try:
        np.save(out, feats.numpy().astype(np.float32))
    except OSError as e:
        fail(f"{out}: cannot write ({e.strerror})")
    print(f"{out}: {feats.shape[0]} frames x {feats.shape[1]} {'ceps' if mfcc else 'bins'}", file=sys.stderr)


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")


@bench_app.command("fbank")
def bench_fbank(
    seconds: float = typer.Option(60.0, help="Length of the audio for the throughput figures."),
    hop_ms: float = typer.Option(100.0, help="Streaming hop."),
    window_s: float = typer.Option(1.0, help="Window recomputed by the non-streaming baseline."),
    threads: int = typer.Option(1, help="torch threads."),
) -> None:
    """fbank throughput against kaldi-native-fbank, and a streaming hop against a recompute."""
    from edgetag import bench

    bench.print_fbank_benchmark(bench.fbank_benchmark(seconds, hop_ms, window_s, threads))


def main() -> None:
    app(prog_name="edgetag")
