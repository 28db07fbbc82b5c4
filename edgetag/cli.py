"""The `edgetag` command: a thin Typer layer over the library.

Each option maps onto one library argument. User mistakes (a missing or corrupt file, a bad
option value) end as one line `edgetag: error: <what>: <reason>` on stderr and exit code 2.
"""

from __future__ import annotations

import math
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
    if out.resolve() == path.resolve():
        fail(f"{out}: is the input; write the features elsewhere")
    try:
        waveform = audio.load(path, config.sample_rate)
    except audio.AudioError as e:
        fail(str(e))
    feats = features.fbank(waveform, config)
    if normalize:
        feats = features.normalize(feats, config)
    from edgetag.output import atomic

    try:  # exactly at `out` (np.save(path) would append .npy), and whole or not at all
        with atomic(out) as tmp, open(tmp, "wb") as f:
            np.save(f, feats.astype(np.float32))
    except OSError as e:
        fail(f"{out}: cannot write ({e.strerror})")
    print(f"{out}: {feats.shape[0]} frames x {feats.shape[1]} {'ceps' if mfcc else 'bins'}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Tagging and keyword spotting: options shared by `file` and `listen`


class BackendName(str, Enum):
    auto = "auto"
    torch = "torch"
    torch_int8 = "torch-int8"
    onnx = "onnx"
    tensorrt = "tensorrt"


def bounded(option: str, lo: float, hi: float, lo_open: bool = False):
    """A callback that lets through a value in [lo, hi] ((lo, hi] with lo_open) and ends anything
    else (NaN and infinity included) as one line naming the option."""

    def check(value):
        if value is None:
            return value
        ok = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
        if not ok:
            fail(f"{option}: {value} is not in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    return check


MODEL = typer.Option(None, "--model", "-m", help="A checkpoint (.safetensors), an export folder or .onnx file, or a TensorRT .plan; default: the bundled model.")
BACKEND = typer.Option(BackendName.auto, help="Inference backend; auto: tensorrt for .plan, onnx for exports and the bundled model, torch for checkpoints.")
WINDOW = typer.Option(None, callback=bounded("--window", 0, 60, lo_open=True), help="Seconds per window (default: the model's).")
HOP = typer.Option(None, callback=bounded("--hop", 0, 60, lo_open=True), help="Seconds between windows (default: the model's).")
TAG_ON = typer.Option(None, callback=bounded("--tag-on", 0, 1),
                      help="A tag starts at this probability (default: the model's calibrated per-class thresholds, else 0.5; a value here overrides them for every tag)...")
TAG_OFF = typer.Option(0.35, callback=bounded("--tag-off", 0, 1), help="...and ends below this one (or below its start threshold, when that is lower).")
KEYWORD_ON = typer.Option(None, callback=bounded("--keyword-on", 0, 1),
                          help="A keyword is spotted at this probability (default: the model's calibrated per-keyword thresholds, else 0.7; a value here overrides them).")
SMOOTHING = typer.Option(None, callback=bounded("--smoothing", 0, 3600),
                         help="Average every head's probabilities over this many seconds of hops (default: the model's calibrated keyword smoothing; 0: none).")
MIN_DURATION = typer.Option(0.0, callback=bounded("--min-duration", 0, 3600), help="Drop tag events shorter than this (seconds).")
SPEECH_GATE = typer.Option(None, callback=bounded("--speech-gate", 0, 1),
                           help="Spot keywords only in hops whose Speech tag reaches this (default: the model's calibrated gate; 0: never gated).")
REFRACTORY = typer.Option(1.0, callback=bounded("--refractory", 0, 3600), help="Seconds after a keyword spot before the next.")
ALL_TAGS = typer.Option(False, "--all-tags", help="Also report a tag while a more specific one is on (Animal beside Dog); default: folded into it.")
CLASSES = typer.Option(None, "--classes", help="Report only this class (repeatable; an exact label, e.g. --classes Dog --classes yes).")
JSON = typer.Option(False, "--json", help="JSON lines, one event per line.")
TASK = typer.Option(None, "--task", help="Run this task of the model (repeatable; 'base': its own heads; default: the base and every task).")
GATE = typer.Option(0.0, callback=bounded("--gate", 0, 100), help="Skip the encoder on windows whose loudest frame is less than this many dB over the noise floor (0: every window runs).")


def _engine(model, backend, threads, window, hop, tag_on, tag_off, keyword_on, speech_gate, smoothing, min_duration, refractory, all_tags, classes, gate, tasks):
    from edgetag import open_stream
    from edgetag.checkpoint import CheckpointError
    from edgetag.runtime import BackendError
    from edgetag.stream import GateConfig

    try:
        return open_stream(model, backend.value, window, hop, threads, gate=GateConfig(margin_db=gate) if gate else None, tasks=tuple(tasks or ()), tag_on=tag_on, tag_off=tag_off,
                           keyword_on=keyword_on, speech_gate=speech_gate, smoothing=smoothing, min_duration=min_duration, refractory=refractory, fold=not all_tags,
                           classes=tuple(classes or ()))
    except (CheckpointError, BackendError, ValueError) as e:
        fail(str(e))


@app.command("file")
def file_(
    paths: list[str] = typer.Argument(..., help="Audio files, folders (searched recursively) or glob patterns."),
    model: Path = MODEL,
    backend: BackendName = BACKEND,
    window: float = WINDOW,
    hop: float = HOP,
    tag_on: float = TAG_ON,
    tag_off: float = TAG_OFF,
    keyword_on: float = KEYWORD_ON,
    speech_gate: float = SPEECH_GATE,
    smoothing: float = SMOOTHING,
    min_duration: float = MIN_DURATION,
    refractory: float = REFRACTORY,
    all_tags: bool = ALL_TAGS,
    classes: list[str] = CLASSES,
    tasks: list[str] = TASK,
    gate: float = GATE,
    json_out: bool = JSON,
    csv_out: bool = typer.Option(False, "--csv", help="CSV with a header row."),
    plot: Path = typer.Option(None, help="PNG: spectrogram and probability timelines with the events (one per file: NAME_<file>.png when several)."),
    threads: int = typer.Option(2, callback=bounded("--threads", 1, 1024), help="Inference threads (torch, ONNX Runtime)."),
) -> None:
    """Tag sound events and spot keywords in files. Exit 0 when every file was processed, 2 when
    any failed (the others are still processed)."""
    from edgetag import audio, output
    from edgetag.stream import process_file

    if json_out and csv_out:
        fail("--json and --csv: choose one output format")
    engine = _engine(model, backend, threads, window, hop, tag_on, tag_off, keyword_on, speech_gate, smoothing, min_duration, refractory, all_tags, classes, gate, tasks)
    files, errors = audio.expand(paths)
    try:
        plots = output.plot_paths(plot, files) if plot else {}
    except ValueError as e:
        fail(str(e))
    for error in errors:
        print(f"edgetag: error: {error}", file=sys.stderr)
    sink = output.CsvOut() if csv_out else None
    model_id = engine.backend.model_id
    for path in files:
        try:
            result = process_file(engine, path)
        except audio.AudioError as e:
            print(f"edgetag: error: {e}", file=sys.stderr)
            errors.append(e)
            continue
        rows = [output.record(e, path, model_id) for e in result.events]
        if gate:
            print(f"{path}: the gate skipped {sum(h.skipped for h in result.hops)} of {len(result.hops)} windows", file=sys.stderr)
        if json_out:
            for row in rows:
                output.json_line(row)
        elif sink:
            for row in rows:
                sink.write(row)
        else:
            output.print_table(rows, f"{path} ({result.seconds:.1f} s)")
        if plot:
            try:
                output.plot(output.spectrogram(path, engine.spec.fbank), result, engine.spec, plots[path], Path(path).name)
            except OSError as e:
                print(f"edgetag: error: {plots[path]}: cannot write the plot ({e.strerror or e})", file=sys.stderr)
                errors.append(e)
    if errors:
        raise typer.Exit(EXIT_BAD_INPUT)


def _interrupt(signum, frame):
    # SIGTERM (systemd, docker stop) ends a session as Ctrl-C does: open events flushed, summary, exit 0
    raise KeyboardInterrupt


@app.command()
def listen(
    model: Path = MODEL,
    backend: BackendName = BACKEND,
    device: str = typer.Option(None, help="Input device: index or part of its name (see `edgetag devices`)."),
    input_file: Path = typer.Option(None, "--input", help="Play this file through the live path in real time instead of a microphone."),
    duration: float = typer.Option(None, callback=bounded("--duration", 0, 10**9, lo_open=True), help="Stop after this many seconds of audio."),
    window: float = WINDOW,
    hop: float = HOP,
    tag_on: float = TAG_ON,
    tag_off: float = TAG_OFF,
    keyword_on: float = KEYWORD_ON,
    speech_gate: float = SPEECH_GATE,
    smoothing: float = SMOOTHING,
    min_duration: float = MIN_DURATION,
    refractory: float = REFRACTORY,
    all_tags: bool = ALL_TAGS,
    classes: list[str] = CLASSES,
    tasks: list[str] = TASK,
    gate: float = GATE,
    json_out: bool = JSON,
    block: float = typer.Option(0.1, callback=bounded("--block", 0, 10, lo_open=True), help="Seconds of audio per block read from the device."),
    threads: int = typer.Option(1, callback=bounded("--threads", 1, 1024), help="Inference threads (torch, ONNX Runtime)."),
) -> None:
    """Live tags and keyword spots from a microphone. Ctrl-C (or SIGTERM) stops with a summary."""
    import contextlib
    import signal

    from edgetag import audio, live, output

    signal.signal(signal.SIGTERM, _interrupt)

    engine = _engine(model, backend, threads, window, hop, tag_on, tag_off, keyword_on, speech_gate, smoothing, min_duration, refractory, all_tags, classes, gate, tasks)
    rate = engine.spec.fbank.sample_rate
    with contextlib.ExitStack() as stack:
        if input_file is not None:
            try:
                audio.info(input_file)
            except audio.AudioError as e:
                fail(str(e))
            blocks, source, counters = audio.realtime(input_file, rate, block), str(input_file), lambda: (0, 0)
        else:
            try:
                mic = stack.enter_context(audio.Microphone(device, rate, block))
            except audio.MicrophoneError as e:
                fail(str(e))
            blocks, source, counters = live.microphone_blocks(mic), f"mic:{mic.device.name}", lambda: (mic.overflows, mic.dropped)
        failed: list[Exception] = []
        blocks = _until_error(blocks, failed)
        model_id = engine.backend.model_id
        if json_out:
            session = live.run(engine, blocks, duration, lambda e, extra: output.json_line(output.record(e, source, model_id, **extra)))
        else:
            from rich.console import Console
            from rich.live import Live

            console = Console()
            view = live.View(engine.spec.heads, source, counters)
            with Live(view(live.Session()), console=console, refresh_per_second=10, transient=False) as screen:
                session = live.run(engine, blocks, duration, lambda e, extra: None, lambda s: screen.update(view(s)))
        overflows, dropped = counters()
    summary = session.summary(overflows, dropped)
    if json_out:
        output.json_line(summary)
    else:
        output.print_table([output.record(e, source, model_id) for e in session.events], "events")
        print(" ".join(f"{k} {v}" for k, v in summary.items() if k != "kind"))
    if failed:
        raise typer.Exit(EXIT_BAD_INPUT)


def _until_error(blocks, failed: list):
    """The blocks until the source fails mid-stream (corrupt audio, a lost device): then one line,
    and the session ends as at Ctrl-C, its events flushed and summarised, but with exit 2."""
    from edgetag import audio

    try:
        yield from blocks
    except (audio.AudioError, audio.MicrophoneError) as e:
        print(f"edgetag: error: {e}", file=sys.stderr)
        failed.append(e)


class TaskAdapter(str, Enum):
    auto = "auto"
    conv = "conv"
    aat = "aat"
    mlp = "mlp"
    none = "none"


@app.command()
def learn(
    name: str = typer.Argument(..., help="The task's name, and its class's unless CLIPS is one folder of class folders."),
    clips: list[str] = typer.Argument(..., help="Clips of the sound (files, folders, glob patterns), or one folder holding a folder of clips per class."),
    into: Path = typer.Option(..., "--into", help="The checkpoint to write: the model with the task; one that exists gets the task added."),
    negatives: list[str] = typer.Option(None, "--negatives", help="Audio without the sound (files, folders, patterns; repeatable); default: built-in noise, hum and silence."),
    model: Path = typer.Option(None, "--model", "-m", help="The checkpoint to add the task to (default: the bundled model; not with an --into that exists)."),
    adapter: TaskAdapter = typer.Option(TaskAdapter.auto, help="The task's adapters: conv (TI-CL's ConvPass), aat, mlp, none (a linear probe on the model's embedding), or auto: conv on a transformer, none on a model without blocks to adapt (a mobilenet)."),
    adapter_dim: int = typer.Option(16, callback=bounded("--adapter-dim", 1, 1024), help="Adapter bottleneck width."),
    layers: int = typer.Option(2, callback=bounded("--layers", 1, 1024), help="Adapted blocks, the last ones (the ones before run once for the base and every task)."),
    steps: int = typer.Option(300, callback=bounded("--steps", 1, 10**6), help="Training steps."),
    seed: int = typer.Option(0, help="Seed of the views and the training."),
    threads: int = typer.Option(2, callback=bounded("--threads", 1, 1024), help="torch threads."),
) -> None:
    """Teach the model new sounds from a handful of clips (TI-CL: the model's own heads stay as they
    are and run beside the new task). Exit 2 when any clip was unreadable (the task is still learned
    from the rest when enough remain)."""
    from edgetag.checkpoint import CheckpointError
    from edgetag.learn import LearnConfig, LearnError, class_clips
    from edgetag.learn import learn as learn_task

    try:
        import torch
    except ImportError:
        fail("edgetag learn trains, which needs torch: pip install 'edgetag[torch]'")
    torch.set_num_threads(threads)
    classes, errors = class_clips(name, clips)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    console = Console(stderr=True)
    config = LearnConfig(adapter=adapter.value, adapter_dim=adapter_dim if adapter != TaskAdapter.none else 0, layers=layers if adapter != TaskAdapter.none else 0,
                         steps=steps, seed=seed)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), console=console,
                  transient=True, disable=not console.is_terminal) as bars:
        shown: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in shown:
                shown[stage] = bars.add_task(stage, total=total)
            bars.update(shown[stage], completed=done)

        try:
            learned, unreadable = learn_task(name, classes, negatives or [], into, model, config, progress)
        except (LearnError, CheckpointError) as e:
            bars.stop()
            for error in errors:
                print(f"edgetag: error: {error}", file=sys.stderr)
            fail(str(e))
    errors += unreadable
    for error in errors:
        print(f"edgetag: error: {error}", file=sys.stderr)
    negatives_text = "built-in noise, hum and silence" if learned.builtin_negatives else f"{learned.negatives} clip(s)"
    print(f"{name}: {', '.join(f'{label} {n} clips ({learned.windows[label]} windows)' for label, n in learned.clips.items())}; negatives: {negatives_text}")
    print(f"trained {learned.trainable:,} parameters ({learned.task.kind}; {100 * learned.trainable / learned.base_parameters:.1f}% of the model's {learned.base_parameters:,}) in {learned.seconds:.1f} s")
    for label, r in learned.calibration.items():
        print(f"threshold {label} {r['threshold']:.2f}: {r['clips_found']}/{r['clips']} of its clips, {r['negatives_firing']}/{r['negatives']} other clips reach it")
    print(f"{learned.path}: written; run it with: edgetag listen --model {learned.path}")
    if errors:
        raise typer.Exit(EXIT_BAD_INPUT)


@app.command()
def devices() -> None:
    """List the audio input devices (for `listen --device`)."""
    from edgetag import audio

    try:
        found = audio.input_devices()
    except audio.MicrophoneError as e:
        fail(str(e))
    if not found:
        fail("no audio input device found")
    for d in found:
        print(f"{'*' if d.default else ' '} {d.index:3d}  {d.name}  ({d.channels} ch, {d.sample_rate:.0f} Hz)")


bench_app = typer.Typer(help="Benchmarks that print their figures.")
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench_device(
    ctx: typer.Context,
    backends: list[BackendName] = typer.Option(None, "--backend", help="Backends whose hop latency is measured (repeatable; default: onnx, and torch when installed)."),
    hours: float = typer.Option(1.0, callback=bounded("--hours", 0, 1000, lo_open=True), help="Audio pushed through the live path for the memory slope."),
    gate_minutes: float = typer.Option(10.0, callback=bounded("--gate-minutes", 1, 600), help="Length of the quiet recording the gate is measured on."),
    data: Path = typer.Option(None, help="Labelled audio for that recording (ESC-50 sounds, Speech Commands words); default: $EDGETAG_DATA or ../shared/data when present, else the bundled example."),
    runs: int = typer.Option(5, callback=bounded("--runs", 1, 100), help="`edgetag file` processes timed for the start-up figure."),
) -> None:
    """Without a subcommand: the device run. Start-up and peak RSS of `edgetag file` on the
    example, listen's RSS over simulated hours, hop latency per backend, the fbank hop ratio and
    the gate's saving; ends with one summary line."""
    if ctx.invoked_subcommand is not None:
        return
    import importlib.util
    import os

    from edgetag import bench

    names = [b.value for b in backends] if backends else ["onnx", *(["torch"] if importlib.util.find_spec("torch") else [])]
    if data is None:
        found = [Path(p) for p in (os.environ.get("EDGETAG_DATA"), "../shared/data") if p and Path(p).is_dir()]
        data = found[0] if found else None
    elif not data.is_dir():
        fail(f"--data: {data}: no such folder")
    try:
        result = bench.device_benchmark(names, hours, gate_minutes, data, runs)
    except RuntimeError as e:
        fail(str(e))
    bench.print_device_benchmark(result)


@bench_app.command("fbank")
def bench_fbank(
    seconds: float = typer.Option(60.0, help="Length of the audio for the throughput figures."),
    hop_ms: float = typer.Option(100.0, help="Streaming hop."),
    window_s: float = typer.Option(1.0, help="Window recomputed by the non-streaming baseline."),
    threads: int = typer.Option(1, callback=bounded("--threads", 1, 1024), help="Inference threads (torch, ONNX Runtime)."),
) -> None:
    """fbank throughput against kaldi-native-fbank, and a streaming hop against a recompute."""
    from edgetag import bench

    bench.print_fbank_benchmark(bench.fbank_benchmark(seconds, hop_ms, window_s, threads))


@bench_app.command("stream")
def bench_stream(
    model: Path = MODEL,
    backend: BackendName = BACKEND,
    seconds: float = typer.Option(30.0, help="Audio per measurement (the bundled example, repeated)."),
    repeats: int = typer.Option(3),
    listen_seconds: float = typer.Option(5.0, help="Real-time seconds of `listen --input` for the memory figure."),
    hop: float = HOP,
) -> None:
    """Per-hop latency by stage (median, p95, 1 thread), file throughput (1 and 2 threads, each in
    its own process, start-up excluded), listen's peak RSS."""
    from edgetag import bench
    from edgetag.checkpoint import CheckpointError
    from edgetag.runtime import BackendError

    try:
        bench.print_stream_benchmark(bench.stream_benchmark(model, seconds, repeats, listen_seconds, hop, backend.value))
    except (CheckpointError, BackendError, RuntimeError) as e:
        fail(str(e))


@bench_app.command("tasks")
def bench_tasks(
    model: Path = typer.Option(..., "--model", "-m", help="A checkpoint with tasks (edgetag learn, train.finetune --task)."),
    backend: BackendName = BACKEND,
    seconds: float = typer.Option(30.0, callback=bounded("--seconds", 1, 3600), help="Audio per measurement (the bundled example, repeated)."),
    repeats: int = typer.Option(3, callback=bounded("--repeats", 1, 100)),
) -> None:
    """Per-hop latency of the model's own heads, of each task beside them and of every task (1 thread)."""
    from edgetag import bench
    from edgetag.checkpoint import CheckpointError
    from edgetag.runtime import BackendError

    try:
        bench.print_task_costs(bench.task_costs(model, backend.value, seconds, repeats))
    except (CheckpointError, BackendError, RuntimeError) as e:
        fail(str(e))


def run_guarded(command, prog: str) -> None:
    """Run a command line. Output that cannot be written ends it as one line and exit 2 (a full
    disk), or quietly (a reader that went away, `| head`), never as a traceback."""
    import os

    try:
        command()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's own flush fails again
        sys.exit(1)
    except OSError as e:
        print(f"{prog}: error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main() -> None:
    run_guarded(lambda: app(prog_name="edgetag"), "edgetag")
