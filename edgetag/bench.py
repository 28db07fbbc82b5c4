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
    rate = 16000
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
