"""Benchmarks that print figures; ratios are measured in the same run, so noise mostly cancels.

    edgetag bench fbank     fbank throughput vs kaldi-native-fbank; streaming hop vs recompute
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from edgetag.features import PRESETS, StreamingFbank, fbank, preset


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fbank_benchmark(seconds: float = 60.0, hop_ms: float = 100.0, window_s: float = 1.0, threads: int = 1) -> dict:
    """Offline throughput on `seconds` of noise, and one streaming hop against a window recompute."""
    torch.set_num_threads(threads)
    rate = PRESETS["ast"].sample_rate
    x = (np.random.default_rng(0).standard_normal(int(seconds * rate)) * 0.1).astype(np.float32)
    results: dict = {"threads": threads, "audio_s": seconds}

    # Kaldi refuses 128 bins on a 512-point FFT, so the head-to-head runs at 80 bins.
    config80 = preset("ast", n_mels=80)
    results["edgetag_128_s"] = median_seconds(lambda: fbank(x, PRESETS["ast"]), repeats=5)
    results["edgetag_80_s"] = median_seconds(lambda: fbank(x, config80), repeats=5)
    try:
        import kaldi_native_fbank as knf
    except ImportError:
        results["knf_80_s"] = None
    else:
        opts = knf.FbankOptions()
        opts.frame_opts.dither, opts.frame_opts.window_type, opts.mel_opts.num_bins = 0.0, "hanning", 80

        def kaldi():
            computer = knf.OnlineFbank(opts)
            computer.accept_waveform(rate, x)
            computer.input_finished()
            return np.stack([computer.get_frame(i) for i in range(computer.num_frames_ready)])

        results["knf_80_s"] = median_seconds(kaldi, repeats=5)

    hop, window = x[: int(hop_ms / 1000 * rate)], x[: int(window_s * rate)]
    stream = StreamingFbank(PRESETS["ast"])
    stream.push(window)
    results["hop_push_s"] = median_seconds(lambda: stream.push(hop), repeats=300)
    results["window_recompute_s"] = median_seconds(lambda: fbank(window, PRESETS["ast"]), repeats=300)
    results["hop_ms"], results["window_s"] = hop_ms, window_s
    return results


def print_fbank_benchmark(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fbank on {r['audio_s']:.0f} s of audio, {r['threads']} thread(s)")
    table.add_column("what")
    table.add_column("time", justify="right")
    table.add_column("x real time", justify="right")
    for label, key in [("edgetag 128 bins", "edgetag_128_s"), ("edgetag 80 bins", "edgetag_80_s"), ("kaldi-native-fbank 80 bins", "knf_80_s")]:
        if r[key] is None:
            table.add_row(label, "not installed", "-")
        else:
            table.add_row(label, f"{r[key] * 1000:.1f} ms", f"{r['audio_s'] / r[key]:.0f}x")
    table.add_row(f"streaming push of a {r['hop_ms']:.0f} ms hop", f"{r['hop_push_s'] * 1e6:.0f} us", "")
    table.add_row(f"fbank() of a {r['window_s']:.0f} s window", f"{r['window_recompute_s'] * 1e6:.0f} us", "")
    Console().print(table)
    if r["knf_80_s"] is not None:
        print(f"throughput edgetag/kaldi-native-fbank (80 bins): {r['knf_80_s'] / r['edgetag_80_s']:.2f}x")
    print(f"streaming hop vs window recompute: {r['window_recompute_s'] / r['hop_push_s']:.1f}x cheaper")


def stream_benchmark(model=None, seconds: float = 30.0, repeats: int = 3, listen_seconds: float = 5.0, hop: float | None = None) -> dict:
    """The streaming engine on real-time hops (1 thread) and on a file (2 threads), and the
    peak memory of `edgetag listen --input` on the bundled example."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import soundfile as sf

    from edgetag import audio
    from edgetag.runtime import load_backend
    from edgetag.stream import Engine, PostConfig, process_file

    example = Path(__file__).parent / "assets" / "example.flac"
    backend = load_backend(model, threads=1)
    engine = Engine(backend, PostConfig(), hop=hop)
    spec, rate = engine.spec, engine.spec.fbank.sample_rate
    clip = audio.load(example, rate)
    x = np.tile(clip, int(np.ceil(seconds * rate / len(clip))))[: int(seconds * rate)]
    step = spec.hop_frames * spec.fbank.frame_shift  # samples per hop
    r: dict = {"model": backend.model_id, "backend": backend.name, "window_s": spec.window_seconds, "hop_s": spec.hop_seconds, "audio_s": seconds}

    torch.set_num_threads(1)
    stages = {"fbank": [], "encoder": [], "post": [], "total": []}
    for _ in range(repeats):
        engine.reset()
        for i in range(0, len(x) - step + 1, step):  # one hop of audio per push, as live audio arrives
            before = (engine.timings.fbank, engine.timings.encoder, engine.timings.post)
            engine.push(x[i : i + step])
            after = (engine.timings.fbank, engine.timings.encoder, engine.timings.post)
            if engine.timings.hops and i >= spec.window_seconds * rate:  # skip the first window's fill
                deltas = [b - a for a, b in zip(before, after)]
                for name, d in zip(("fbank", "encoder", "post"), deltas):
                    stages[name].append(d)
                stages["total"].append(sum(deltas))
    for name, values in stages.items():
        r[f"{name}_median_s"] = float(np.median(values))
        r[f"{name}_p95_s"] = float(np.percentile(values, 95))
    r["hop_share"] = r["total_median_s"] / spec.hop_seconds  # of the audio duration a hop covers
    r["rtf_1_thread"] = float(np.sum(stages["total"]) / (len(stages["total"]) * spec.hop_seconds))

    torch.set_num_threads(2)
    engine = Engine(load_backend(model, threads=2), PostConfig(), hop=spec.stream.hop)
    path = Path(tempfile.mkdtemp()) / "bench.wav"
    sf.write(path, x, rate)
    r["file_s"] = median_seconds(lambda: process_file(engine, path), repeats=repeats, warmup=1)
    r["file_x_realtime"] = seconds / r["file_s"]

    command = [sys.executable, "-m", "edgetag", "listen", "--input", str(example), "--duration", str(listen_seconds), "--json"]
    if model is not None:
        command += ["--model", str(model)]
    # RUSAGE_CHILDREN is the largest of every child this process ever waited for (an export, a
    # teacher...): a fresh process whose one child is `listen` reports listen's own peak
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    peak_kib = subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True).stdout.strip()
    r["listen_peak_rss_mib"] = int(peak_kib) / 1024
    return r


def print_stream_benchmark(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"streaming engine, {r['model']} ({r['backend']}): {r['window_s']:.3f} s windows every {r['hop_s']:.2f} s")
    for column in ("per hop, 1 thread", "median", "p95"):
        table.add_column(column, justify="left" if column.startswith("per") else "right")
    for name in ("fbank", "encoder", "post", "total"):
        table.add_row(name if name != "fbank" else "fbank increment", f"{r[f'{name}_median_s'] * 1000:.2f} ms", f"{r[f'{name}_p95_s'] * 1000:.2f} ms")
    Console().print(table)
    print(f"a hop costs {100 * r['hop_share']:.2f}% of its {r['hop_s']:.2f} s of audio (real-time factor {r['rtf_1_thread']:.4f}, 1 thread)")
    print(f"file: {r['audio_s']:.0f} s of audio in {r['file_s']:.3f} s = {r['file_x_realtime']:.0f}x real time (2 threads)")
    print(f"listen --input: peak RSS {r['listen_peak_rss_mib']:.0f} MiB")
