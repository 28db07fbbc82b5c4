"""Benchmarks that print figures; ratios are measured in the same run, so noise mostly cancels.

    edgetag bench           the device run: start-up and memory of `edgetag file`, listen's memory
                            over a simulated hour, hop latency per backend, the fbank hop ratio, the
                            gate on a long quiet recording; ends with one summary line
    edgetag bench fbank     fbank throughput vs kaldi-native-fbank; streaming hop vs recompute
    edgetag bench stream    one backend's hop latency by stage, file throughput at 1 and 2 threads

Whatever loads a model for a figure about a process (start-up, memory, threads) runs in a fresh
process of its own: torch's thread pool is process-wide, and a peak RSS is a process's.
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

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


def hop_push_seconds(config, hop: np.ndarray, primer: np.ndarray, repeats: int) -> float:
    """Median seconds of one streaming fbank push of `hop`, after `primer` filled the stream."""
    stream = StreamingFbank(config)
    stream.push(primer)
    return median_seconds(lambda: stream.push(hop), repeats=repeats)


def fbank_benchmark(seconds: float = 60.0, hop_ms: float = 100.0, window_s: float = 1.0, threads: int = 1) -> dict:
    """Offline throughput on `seconds` of noise, and one streaming hop against a window recompute
    (numpy's FFT and matmul; `threads` is recorded for kaldi-native-fbank's sake, which uses one)."""
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
    results["hop_push_s"] = hop_push_seconds(PRESETS["ast"], hop, window, repeats=300)
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


EXAMPLE = Path(__file__).parent / "assets" / "example.flac"


def in_subprocess(function: str, *args) -> object:
    """`edgetag.bench.<function>(*args)` in a fresh Python process; its JSON result."""
    code = f"import json, sys; from edgetag import bench; print(json.dumps(bench.{function}(*json.loads(sys.argv[1]))))"
    run = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) if isinstance(a, Path) else a for a in args])], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"bench.{function}: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else 'failed'}")
    return json.loads(run.stdout.splitlines()[-1])


def peak_rss_mib(command: list[str]) -> float:
    """The peak RSS of one run of `command`, measured from a fresh probe process: RUSAGE_CHILDREN is
    the largest of every child a process ever waited for, and the probe's only child is this one."""
    probe = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    return int(subprocess.run([sys.executable, "-c", probe, *command], check=True, capture_output=True, text=True).stdout.strip()) / 1024


def example_audio(seconds: float, rate: int) -> np.ndarray:
    from edgetag import audio

    clip = audio.load(EXAMPLE, rate)
    return np.tile(clip, int(np.ceil(seconds * rate / len(clip))))[: int(seconds * rate)]


def hop_latency(model=None, backend: str = "auto", seconds: float = 30.0, repeats: int = 3, hop: float | None = None, tasks: tuple[str, ...] = ()) -> dict:
    """Per-hop cost by stage, one hop of audio pushed at a time as live audio arrives, 1 thread."""
    engine = hop_engine(model, backend, hop, tasks)
    x = example_audio(seconds, engine.spec.fbank.sample_rate)
    stages = {"fbank": [], "encoder": [], "post": [], "total": []}
    for _ in range(repeats):
        time_hops(engine, x, stages)
    return hop_figures(engine, seconds, stages)


def hop_engine(model, backend: str, hop: float | None = None, tasks: tuple[str, ...] = ()):
    from edgetag.runtime import load_backend
    from edgetag.stream import Engine, PostConfig

    return Engine(load_backend(model, backend, threads=1, tasks=tasks), PostConfig(), hop=hop)


def time_hops(engine, x: np.ndarray, stages: dict[str, list[float]]) -> None:
    """Push `x` one hop at a time through a fresh stream; each hop's seconds by stage into `stages`."""
    spec, rate = engine.spec, engine.spec.fbank.sample_rate
    step = spec.hop_frames * spec.fbank.frame_shift  # samples per hop
    engine.reset()
    for i in range(0, len(x) - step + 1, step):
        before = (engine.timings.fbank, engine.timings.encoder, engine.timings.post)
        engine.push(x[i : i + step])
        after = (engine.timings.fbank, engine.timings.encoder, engine.timings.post)
        if engine.timings.hops and i >= spec.window_seconds * rate:  # skip the first window's fill
            deltas = [b - a for a, b in zip(before, after)]
            for name, d in zip(("fbank", "encoder", "post"), deltas):
                stages[name].append(d)
            stages["total"].append(sum(deltas))


def hop_figures(engine, seconds: float, stages: dict[str, list[float]]) -> dict:
    spec = engine.spec
    r: dict = {"model": engine.backend.model_id, "backend": engine.backend.name, "window_s": spec.window_seconds, "hop_s": spec.hop_seconds, "audio_s": seconds}
    for name, values in stages.items():
        r[f"{name}_median_s"] = float(np.median(values))
        r[f"{name}_p95_s"] = float(np.percentile(values, 95))
    r["hop_share"] = r["total_median_s"] / spec.hop_seconds  # of the audio duration a hop covers
    r["rtf_1_thread"] = float(np.sum(stages["total"]) / (len(stages["total"]) * spec.hop_seconds))
    return r


def file_throughput(model, backend: str, threads: int, path: str, repeats: int, hop: float | None = None) -> float:
    """Median seconds `process_file` takes on `path`, the model loaded and warmed first (start-up
    excluded); run it in a process of its own (`in_subprocess`), where `threads` is set once."""
    from edgetag.runtime import load_backend
    from edgetag.stream import Engine, PostConfig, process_file

    engine = Engine(load_backend(None if model in (None, "None") else model, backend, threads=threads), PostConfig(), hop=hop)
    return median_seconds(lambda: process_file(engine, path), repeats=repeats, warmup=1)


def stream_benchmark(model=None, seconds: float = 30.0, repeats: int = 3, listen_seconds: float = 5.0, hop: float | None = None, backend: str = "auto") -> dict:
    """The streaming engine on real-time hops (1 thread), on a file at 1 and 2 threads, and the
    peak memory of `edgetag listen --input` on the bundled example."""
    import soundfile as sf

    r = hop_latency(model, backend, seconds, repeats, hop)
    path = Path(tempfile.mkdtemp()) / "bench.wav"
    sf.write(path, example_audio(seconds, PRESETS["ast"].sample_rate), PRESETS["ast"].sample_rate)
    for threads in (1, 2):
        r[f"file_{threads}_s"] = in_subprocess("file_throughput", model, backend, threads, path, repeats, r["hop_s"])
        r[f"file_{threads}_x_realtime"] = seconds / r[f"file_{threads}_s"]
    command = [sys.executable, "-m", "edgetag", "listen", "--input", str(EXAMPLE), "--duration", str(listen_seconds), "--json", "--backend", backend]
    r["listen_peak_rss_mib"] = peak_rss_mib(command + (["--model", str(model)] if model is not None else []))
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
    for threads in (1, 2):
        print(f"file, {threads} thread{'s' * (threads > 1)}: {r['audio_s']:.0f} s of audio in {r[f'file_{threads}_s']:.3f} s = {r[f'file_{threads}_x_realtime']:.0f}x real time")
    print(f"listen --input: peak RSS {r['listen_peak_rss_mib']:.0f} MiB")


def task_costs(model, backend: str = "auto", seconds: float = 30.0, repeats: int = 3) -> dict:
    """Per-hop latency of the model's own heads alone, with each task beside them, and with
    every task: what a task adds to a hop (its adapted blocks and head; a linear probe only its
    head, the base's blocks being shared). The runs take turns, `repeats` rounds, so a machine
    that slows down slows all of them."""
    every = hop_engine(model, backend)
    configs = every.backend.tasks
    if not configs:
        raise RuntimeError(f"{model}: has no tasks (add some with edgetag learn or train.finetune --task)")
    runs = {"base": ("base",), **{f"base + {n}": ("base", n) for n in configs}}
    engines = {**{label: hop_engine(model, backend, tasks=tasks) for label, tasks in runs.items()}, "base + every task": every}
    x = example_audio(seconds, every.spec.fbank.sample_rate)
    stages = {label: {"fbank": [], "encoder": [], "post": [], "total": []} for label in engines}
    for _ in range(repeats):
        for label, engine in engines.items():
            time_hops(engine, x, stages[label])
    rows = {label: hop_figures(engine, seconds, stages[label]) for label, engine in engines.items()}
    tasks = {n: {"adapter": t.adapter, "layers": t.layers, "adapter_dim": t.adapter_dim} for n, t in configs.items()}
    return {"model": rows["base"]["model"], "backend": rows["base"]["backend"], "rows": rows, "tasks": tasks, "repeats": repeats}


def print_task_costs(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = r["rows"]["base"]
    table = Table(title=f"per-hop cost of tasks, {r['model']} ({r['backend']}, 1 thread)")
    for column in ("run", "adapters", "encoder median", "added to the base", "total median", "p95"):
        table.add_column(column, justify="left" if column in ("run", "adapters") else "right")
    for label, row in r["rows"].items():
        name = label.removeprefix("base + ")
        t = r["tasks"].get(name)
        adapters = "-" if t is None else ("none (linear)" if t["adapter"] == "none" else f"{t['adapter']} {t['adapter_dim']} in the last {t['layers']}")
        added = row["encoder_median_s"] - base["encoder_median_s"]
        table.add_row(label, adapters, f"{row['encoder_median_s'] * 1000:.2f} ms", "-" if label == "base" else f"{added * 1000:+.2f} ms ({row['encoder_median_s'] / base['encoder_median_s']:.2f}x)",
                      f"{row['total_median_s'] * 1000:.2f} ms", f"{row['total_p95_s'] * 1000:.2f} ms")
    Console().print(table)
    every = r["rows"]["base + every task"]
    print(f"every task beside the base: {every['encoder_median_s'] / base['encoder_median_s']:.2f}x the base's encoder time per hop")


# ---------------------------------------------------------------------------------------------
# The device run: `edgetag bench`


def startup(runs: int = 5) -> dict:
    """`edgetag file` on the bundled example with the bundled model, as a user runs it: the
    process's wall time (median of `runs`) and its peak RSS."""
    command = [sys.executable, "-m", "edgetag", "file", str(EXAMPLE)]
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return {"startup_s": statistics.median(times), "startup_runs": runs, "rss_mib": peak_rss_mib(command)}


def listen_memory(hours: float = 1.0, samples: int = 13, backend: str = "auto") -> dict:
    """The live path (`live.run`, 0.1 s blocks) over `hours` of audio pushed as fast as it runs,
    the process's RSS read `samples` times along the way: a leak shows as a slope."""
    from edgetag import live, open_stream

    engine = open_stream(backend=backend)
    rate = engine.spec.fbank.sample_rate
    clip, block = example_audio(60.0, rate), rate // 10  # 60 s hold whole 0.1 s blocks
    total, marks, rss = int(hours * 3600 * rate), set(np.linspace(0, hours * 3600 * 10, samples).astype(int)[1:]), []

    def blocks():
        for i in range(total // block):
            if i in marks or i == 0:
                rss.append((i * block / rate / 3600, proc_status("VmRSS") / 2**20))
            start = i * block % len(clip)
            yield clip[start : start + block]
        rss.append((total / rate / 3600, proc_status("VmRSS") / 2**20))

    start = time.perf_counter()
    session = live.run(engine, blocks(), None, lambda e, extra: None)
    hours_axis, mib = np.array(rss).T
    # the slope after the first sample: the start-up (model, first batches) is not a leak
    slope = float(np.polyfit(hours_axis[1:], mib[1:], 1)[0])
    return {"listen_hours": hours, "listen_wall_s": time.perf_counter() - start, "listen_hops": session.hops,
            "listen_rss_start_mib": float(mib[1]), "listen_rss_end_mib": float(mib[-1]), "listen_rss_slope_mib_per_hour": slope}


def cpu_name() -> str:
    """The CPU benchmarks ran on, as /proc/cpuinfo names it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def proc_status(field: str) -> int:
    """A size in this process's /proc/self/status (VmRSS, VmHWM), in bytes; Linux only (OSError
    elsewhere)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def quiet_recording(minutes: float, data: Path | None, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """A long recording that is mostly room tone: pink noise at -60 dBFS, with a real clip every
    10-40 s (ESC-50 fold 4 sounds and Speech Commands keywords from `data` when it holds them,
    else the bundled example), each at a random level of -30 to -12 dBFS. Returns the audio and
    (start, end in seconds, clip) of every clip placed."""
    from edgetag import audio

    rate, rng = PRESETS["ast"].sample_rate, np.random.default_rng(seed)
    clips = [EXAMPLE]
    if data is not None and (data / "esc50").is_dir():
        sounds = sorted((data / "esc50" / "audio").glob("*.flac"))
        words = sorted(p for word in ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go") for p in (data / "speech_commands" / word).glob("*.flac"))
        clips = [sounds[i] for i in rng.choice(len(sounds), 40, replace=False)] + [words[i] for i in rng.choice(len(words), 40, replace=False)]
    n = int(minutes * 60 * rate)
    white = rng.standard_normal(n + 1)
    pink = np.fft.irfft(np.fft.rfft(white) / np.sqrt(np.maximum(np.arange(n // 2 + 1), 1)), n)  # 1/f power
    x = pink / np.sqrt(np.mean(pink**2)) * 10 ** (-60 / 20)
    placed, t = [], rng.uniform(10, 40)
    while t < minutes * 60 - 6:
        path = clips[rng.integers(len(clips))]
        clip = audio.load(path, rate)
        clip = clip / max(np.sqrt(np.mean(clip**2)), 1e-6) * 10 ** (rng.uniform(-30, -12) / 20)
        start = int(t * rate)
        x[start : start + len(clip)] += clip[: n - start]
        placed.append((t, t + len(clip) / rate, Path(path).name))
        t += len(clip) / rate + rng.uniform(10, 40)
    return np.clip(x, -1, 1).astype(np.float32), placed


def gate_benchmark(minutes: float = 10.0, data: Path | None = None, margin_db: float = 10.0, backend: str = "auto") -> dict:
    """The bundled model on a quiet recording with and without the gate: the share of encoder
    passes saved, and the events of the ungated engine (at the calibrated thresholds) that the
    gated one does not report (same kind and label, overlapping in time), and how many of those
    lie on a placed clip: half their span or more (the others the model heard in the room tone,
    pink noise it takes for "Fire" at 0.36-0.39)."""
    from edgetag import open_stream
    from edgetag.stream import GateConfig, process_blocks

    x, placed = quiet_recording(minutes, data)
    results = {}
    for name, gate in (("ungated", None), ("gated", GateConfig(margin_db=margin_db))):
        engine = open_stream(backend=backend, gate=gate)
        r = process_blocks(engine, (x[i : i + 16000] for i in range(0, len(x), 16000)))
        results[name] = (r.events, sum(h.skipped for h in r.hops), len(r.hops), engine.timings.encoder)
    (plain, _, hops, plain_s), (gated, skipped, _, gated_s) = results["ungated"], results["gated"]
    lost = [e for e in plain if not any(g.kind == e.kind and g.label == e.label and g.start < e.end and g.end > e.start for g in gated)]
    on_clips = lambda events: [e for e in events if sum(max(0.0, min(b, e.end) - max(a, e.start)) for a, b, _ in placed) >= (e.end - e.start) / 2]  # noqa: E731
    return {"gate_minutes": minutes, "gate_clips": len(placed), "gate_margin_db": margin_db, "gate_hops": hops, "gate_skipped": skipped,
            "gate_saved": skipped / hops, "gate_events": len(plain), "gate_lost": len(lost), "gate_lost_events": [e.to_dict() for e in lost],
            "gate_events_on_clips": len(on_clips(plain)), "gate_lost_on_clips": len(on_clips(lost)),
            "gate_encoder_s": [plain_s, gated_s], "gate_data": "shared data" if len(placed) and data is not None and (data / "esc50").is_dir() else "bundled example"}


def device_benchmark(backends: list[str], hours: float = 1.0, gate_minutes: float = 10.0, data: Path | None = None, runs: int = 5) -> dict:
    r = {**startup(runs), **fbank_benchmark(seconds=10.0)}
    r["fbank_hop_ratio"] = r["window_recompute_s"] / r["hop_push_s"]
    r["hops"] = {name: in_subprocess("hop_latency", None, name, 30.0, 3) for name in backends}
    r.update(in_subprocess("listen_memory", hours))
    r.update(gate_benchmark(gate_minutes, data))
    return r


def print_device_benchmark(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    print(f"edgetag file {EXAMPLE.name}: {r['startup_s']:.2f} s wall (median of {r['startup_runs']} processes), peak RSS {r['rss_mib']:.0f} MiB")
    table = Table(title="one hop pushed at a time, 1 thread (bundled model)")
    for column in ("backend", "fbank increment", "encoder", "post", "total median", "total p95"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for name, h in r["hops"].items():
        table.add_row(f"{name} ({h['backend']})", *(f"{h[f'{k}_median_s'] * 1000:.2f} ms" for k in ("fbank", "encoder", "post", "total")), f"{h['total_p95_s'] * 1000:.2f} ms")
    console.print(table)
    print(f"fbank: a {r['hop_ms']:.0f} ms streaming hop {r['hop_push_s'] * 1e6:.0f} us vs a {r['window_s']:.0f} s window recomputed "
          f"{r['window_recompute_s'] * 1e6:.0f} us: {r['fbank_hop_ratio']:.1f}x")
    print(f"listen over {r['listen_hours']:g} h of audio ({r['listen_hops']} hops in {r['listen_wall_s']:.0f} s): RSS {r['listen_rss_start_mib']:.0f} -> "
          f"{r['listen_rss_end_mib']:.0f} MiB, slope {r['listen_rss_slope_mib_per_hour']:+.2f} MiB/h")
    print(f"gate (+{r['gate_margin_db']:g} dB over the noise floor) on {r['gate_minutes']:g} min of room tone with {r['gate_clips']} clips ({r['gate_data']}): "
          f"{r['gate_skipped']} of {r['gate_hops']} encoder passes skipped ({100 * r['gate_saved']:.1f}%), "
          f"encoder {r['gate_encoder_s'][0]:.2f} s -> {r['gate_encoder_s'][1]:.2f} s")
    print(f"  events of the ungated engine lost: {r['gate_lost_on_clips']} of the {r['gate_events_on_clips']} on the clips, "
          f"{r['gate_lost'] - r['gate_lost_on_clips']} of the {r['gate_events'] - r['gate_events_on_clips']} heard in the room tone alone")
    for e in r["gate_lost_events"]:
        print(f"  lost: {e['kind']} {e['label']} {e['start']:.2f}-{e['end']:.2f} s ({e['score']:.2f})")
    first = next(iter(r["hops"].values()))
    print(f"startup_s {r['startup_s']:.2f} rss_mib {r['rss_mib']:.0f} hop_ms {first['total_median_s'] * 1000:.2f} "
          f"fbank_hop_ratio {r['fbank_hop_ratio']:.1f}x gate_saved {100 * r['gate_saved']:.1f}%")
