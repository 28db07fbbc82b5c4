"""`edgetag learn`: teach a model new sounds from a handful of clips, on the CPU, in about a minute.

    edgetag learn doorbell clips/doorbell/*.wav --negatives clips/other/ --into my.safetensors
    edgetag learn kitchen clips/kitchen/ --into my.safetensors    # clips/kitchen/<class>/...: a class per folder
    edgetag listen --model my.safetensors                          # the built-in tags and keywords, and doorbell

The clips become a task of the model (`TaskConfig`, TI-CL's task-incremental learning): a tag head
and its own adapters in the last blocks, trained while the base stays frozen, so the model's own
heads answer as before and run beside it. Every window of a clip within `LOUD_DB` of its loudest
window is an example of its class; the windows of the negatives, and of the other classes' clips,
are examples of none. Each window is heard in a few views (mixed with a negative at a random SNR,
at another gain). The base being frozen, the blocks before the first adapted one run once per
view: training runs only the adapted blocks.

Each class's threshold is then set through the streaming engine, on the clips themselves: halfway
between the highest probability any negative clip reaches and the lowest peak of the class's
clips, or, when those overlap, where clip-level F1 is best. These are the training clips, so the
figures it prints are optimistic; give --negatives from the place the model will listen in. With
no --negatives, built-in ones stand in (silence, white, pink and brown noise, mains hum), which
only teach the task what is not a sound at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from edgetag import audio
from edgetag.checkpoint import DEFAULT_MODEL, load_model, save
from edgetag.features import fbank, normalize, windows
from edgetag.spec import TAGS, HeadConfig, ModelSpec, SpecError, TaskConfig

LOUD_DB = 10.0  # a clip's windows this close to its loudest hold the sound
VIEWS = 4  # per positive window: itself, and mixed or scaled copies
MAX_NEGATIVE_WINDOWS = 3000


class LearnError(ValueError):
    """Clips or settings a task cannot be learned from; `str()` names what and why."""


@dataclass
class LearnConfig:
    # TaskConfig.adapter: "conv" (TI-CL), "mlp", "aat", "none" (a linear probe), or "auto": conv on
    # a transformer base, none on a base without blocks to adapt (a mobilenet, a Mamba encoder)
    adapter: str = "auto"
    adapter_dim: int = 16
    layers: int = 2  # adapted blocks, the last ones
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    hop: float = 0.1  # seconds between the training windows of a clip
    seed: int = 0
    min_clips: int = 3  # per class: fewer is a recording, not a class (the few-shot benchmark goes down to 1)


def resolve_adapter(adapter: str, spec: ModelSpec) -> str:
    """`auto` made concrete for a base: conv adapters on a transformer, a linear probe otherwise."""
    if adapter != "auto":
        return adapter
    return "conv" if spec.encoder.encoder == "transformer" else "none"


@dataclass
class Learned:
    """What `learn` made: the checkpoint written, and the figures it prints."""

    path: Path
    name: str
    clips: dict[str, int]
    windows: dict[str, int]
    negatives: int
    builtin_negatives: bool
    trainable: int
    base_parameters: int
    seconds: float
    calibration: dict[str, dict]
    task: TaskConfig


# ---------------------------------------------------------------------------------------------
# Clips


def class_clips(name: str, inputs: list[str]) -> tuple[dict[str, list[str]], list[audio.AudioError]]:
    """{class: files}: one folder whose sub-folders hold audio is a class per sub-folder; any
    other inputs are clips of the class `name`."""
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        folders = sorted(p for p in Path(inputs[0]).iterdir() if p.is_dir())
        found = {p.name: audio.expand([str(p)]) for p in folders}
        found = {label: result for label, result in found.items() if result[0]}
        if found:
            return {label: files for label, (files, _) in found.items()}, []
    files, errors = audio.expand(inputs)
    return {name: files}, errors


def read_clips(files: list[str], rate: int, errors: list) -> list[tuple[str, np.ndarray]]:
    out = []
    for path in files:
        try:
            out.append((path, audio.load(path, rate)))
        except audio.AudioError as e:
            errors.append(e)
    return out


def builtin_negatives(rate: int, seconds: float = 10.0, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Sounds that are no sound of anyone's: near-silence, white, pink and brown noise at two
    levels, mains hum with harmonics."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    white = rng.standard_normal(n)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1 / rate), 1.0)
    coloured = {"pink": np.fft.irfft(spectrum / np.sqrt(f), n), "brown": np.fft.irfft(spectrum / f, n)}
    t = np.arange(n) / rate
    hum = sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 6))
    out = [("silence", 1e-4 * white)]
    for level in (0.01, 0.1):  # about -40 and -20 dBFS
        for label, x in (("white", white), *coloured.items(), ("hum", hum)):
            out.append((f"{label} {level:g}", level * x / np.sqrt(np.mean(x**2))))
    return [(label, x.astype(np.float32)) for label, x in out]


def segments(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    """[n, length] windows of a waveform every `hop` samples (one, silence-padded, when shorter)."""
    if len(x) < length:
        return np.pad(x, (0, length - len(x)))[None]
    starts = np.arange(0, len(x) - length + 1, hop)
    return np.stack([x[s : s + length] for s in starts])


def loud(segs: np.ndarray) -> np.ndarray:
    """The windows within LOUD_DB of the loudest."""
    level = 10 * np.log10(power(segs)[:, 0])
    return segs[level >= level.max() - LOUD_DB]


def power(x: np.ndarray) -> np.ndarray:
    """Mean power of each row, [n, 1]."""
    return np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-12


def views(positives: np.ndarray, negatives: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """VIEWS per positive window: itself, then copies at a gain in +-6 dB, half of them mixed with
    a negative window 0-15 dB below it."""
    out = [positives]
    for _ in range(VIEWS - 1):
        x = positives * 10 ** (rng.uniform(-6, 6, (len(positives), 1)) / 20)
        other = negatives[rng.integers(0, len(negatives), len(positives))]
        scale = np.sqrt(power(x) / power(other) / 10 ** (rng.uniform(0, 15, (len(x), 1)) / 10))
        out.append(np.where(rng.random((len(x), 1)) < 0.5, x + scale * other, x))
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Learning


def learn(name: str, classes: dict[str, list[str]], negatives: list[str], into, model=None, config: LearnConfig | None = None,
          progress=None) -> tuple[Learned, list[audio.AudioError]]:
    """Train task `name` for `classes` ({class: clip files}) on `model` (None: the bundled model;
    `into` itself when it exists) and write the model with the task to `into`. Unreadable
    clips are skipped and returned; too few readable clips per class is a LearnError."""
    import torch

    from edgetag.model import AudioTransformer, num_parameters

    c = config or LearnConfig()
    into = Path(into)
    if into.resolve() == DEFAULT_MODEL.resolve():
        raise LearnError(f"--into {into}: is the bundled model; write the task into a file of your own")
    if into.exists() and model is not None and Path(model).resolve() != into.resolve():
        raise LearnError(f"--into {into}: exists, so the task is added to it; leave out --model")
    source = into if into.exists() else model
    base = load_model(source)
    spec = base.spec
    if name in spec.tasks:
        raise LearnError(f"{name}: {source or DEFAULT_MODEL} has a task of that name already; choose another")
    try:
        head = HeadConfig(TAGS, tuple(classes))
        adapter = resolve_adapter(c.adapter, spec)
        task = TaskConfig(head) if adapter == "none" else TaskConfig(head, adapter, c.adapter_dim, c.layers)
        spec = replace(spec, tasks={**spec.tasks, name: task})
    except (SpecError, ValueError) as e:
        raise LearnError(f"{name}: {e}") from e

    rate, errors = spec.fbank.sample_rate, []
    clips = {label: read_clips(files, rate, errors) for label, files in classes.items()}
    for label, read in clips.items():
        if len(read) < c.min_clips:
            raise LearnError(f"{label}: {len(read)} readable clip(s) of {len(classes[label])}; edgetag learn needs at least {c.min_clips} per class")
    files, negative_errors = audio.expand(negatives) if negatives else ([], [])
    errors += negative_errors
    negative_clips = read_clips(files, rate, errors) if negatives else builtin_negatives(rate)
    if not negative_clips:
        raise LearnError(f"--negatives: no readable audio in {', '.join(negatives)} ({errors[-1] if errors else 'no audio files'})")

    start = time.perf_counter()
    torch.manual_seed(c.seed)
    samples = spec.window_samples
    waves, targets, positive = examples(clips, negative_clips, samples, max(1, round(c.hop * rate)), np.random.default_rng(c.seed))
    grown = AudioTransformer(spec)  # the base with the new task
    missing, unexpected = grown.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"tasks.{name}.") for k in missing)
    grown.eval()
    for p in grown.parameters():
        p.requires_grad = False
    params = fit(grown, name, waves, targets, c, progress or (lambda stage, done, total: None))
    thresholds, calibration = calibrate(grown, name, clips, negative_clips)
    seconds = time.perf_counter() - start
    task = replace(spec.tasks[name], thresholds=thresholds, provenance={
        "stage": "learn", "config": asdict(c), "clips": {label: [p for p, _ in read] for label, read in clips.items()},
        "negatives": [p for p, _ in negative_clips] if negatives else "built-in", "calibration": calibration, "seconds": round(seconds, 1)})
    grown.spec = replace(spec, tasks={**spec.tasks, name: task})
    save(into, grown)
    learned = Learned(into, name, {label: len(read) for label, read in clips.items()}, {label: len(w) for label, w in positive.items()},
                      len(negative_clips), not negatives, sum(p.numel() for p in params), num_parameters(base), seconds, calibration, task)
    return learned, errors


def examples(clips: dict[str, list[tuple[str, np.ndarray]]], negatives: list[tuple[str, np.ndarray]], samples: int, hop: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """The training windows (views of each class's loud windows, then the negatives' windows),
    their targets [windows, classes] (a negative's: all zero), and each class's loud windows."""
    negative_windows = np.concatenate([segments(x, samples, 4 * hop) for _, x in negatives])
    negative_windows = negative_windows[rng.permutation(len(negative_windows))[:MAX_NEGATIVE_WINDOWS]]
    positive = {label: np.concatenate([loud(segments(x, samples, hop)) for _, x in read]) for label, read in clips.items()}
    waves = [views(w, negative_windows, rng) for w in positive.values()] + [negative_windows]
    eye = np.eye(len(clips), dtype=np.float32)
    targets = np.concatenate([np.repeat(eye[k : k + 1], len(w), 0) for k, w in enumerate(waves[:-1])] + [np.zeros((len(negative_windows), len(clips)), np.float32)])
    return np.concatenate(waves), targets, positive


def fit(model, name: str, waves: np.ndarray, targets: np.ndarray, c: LearnConfig, report) -> list:
    """Train task `name` of the frozen `model` on the windows; its parameters. The blocks before
    the task's first run once per window, so each step runs only the task's blocks; a batch is
    half the classes' windows (evenly) and half negatives."""
    import torch

    spec, branch = model.spec, model.tasks[name]
    params = list(branch.parameters())
    for p in params:
        p.requires_grad = True
    with torch.no_grad():
        trunk = []
        for i in range(0, len(waves), 64):
            feats = np.stack([windows(fbank(w, spec.fbank), spec.window_frames, spec.window_frames)[0] for w in waves[i : i + 64]])
            trunk.append(model.encoder.forward_trunk(torch.from_numpy(normalize(feats, spec.fbank)), branch.first))
            report("hearing the clips", min(i + 64, len(waves)), len(waves))
        trunk = torch.cat(trunk)
    y = torch.from_numpy(targets)

    def logits(tokens: torch.Tensor) -> torch.Tensor:  # a linear task's branch has no blocks: the norm alone
        return branch.head(model.pool(model.encoder.forward_branch(tokens, branch)))

    classes = targets.shape[1]
    groups = [torch.from_numpy(np.flatnonzero(targets[:, k] > 0)) for k in range(classes)] + [torch.from_numpy(np.flatnonzero(targets.sum(1) == 0))]
    per = max(1, c.batch_size // (2 * classes))
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(c.seed)
    branch.train()
    for step in range(c.steps):
        for g in optimizer.param_groups:
            g["lr"] = c.lr * 0.5 * (1 + math.cos(math.pi * step / c.steps))
        index = torch.cat([group[torch.randint(len(group), (per if k < classes else per * classes,), generator=generator)] for k, group in enumerate(groups)])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits(trunk[index]), y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report("training", step + 1, c.steps)
    branch.eval()
    for p in params:
        p.requires_grad = False
    return params


def calibrate(model, name: str, clips: dict[str, list[tuple[str, np.ndarray]]], negatives: list[tuple[str, np.ndarray]]) -> tuple[dict, dict]:
    """Per class, the threshold and what it gives on the clips: each clip's peak hop probability
    through the streaming engine (a tag event starts where a hop reaches the threshold)."""
    from edgetag.runtime import TorchBackend
    from edgetag.stream import Engine, process_blocks

    engine = Engine(TorchBackend(model, tasks=(name,)))

    def peaks(x: np.ndarray) -> np.ndarray:
        hops = process_blocks(engine, [x]).hops
        return np.stack([h.probabilities[name] for h in hops]).max(0)

    classes = list(clips)
    clip_peaks = {label: np.stack([peaks(x) for _, x in read]) for label, read in clips.items()}  # [clips, classes]
    negative_peaks = np.stack([peaks(x) for _, x in negatives])
    thresholds, report = {}, {}
    for k, label in enumerate(classes):
        pos = clip_peaks[label][:, k]
        neg = np.concatenate([negative_peaks[:, k], *[clip_peaks[other][:, k] for other in classes if other != label]])
        if pos.min() > neg.max():
            t = (pos.min() + neg.max()) / 2
        else:  # the best clip-level F1; on a tie the highest, for fewer false alarms
            grid = np.round(np.arange(0.05, 1.0, 0.01), 2)
            f1 = [2 * (pos >= g).sum() / max(1, 2 * (pos >= g).sum() + (neg >= g).sum() + (pos < g).sum()) for g in grid]
            t = grid[len(f1) - 1 - int(np.argmax(f1[::-1]))]
        t = float(np.clip(round(float(t), 4), 0.05, 0.99))
        thresholds[label] = t
        report[label] = {"threshold": t, "clips_found": int((pos >= t).sum()), "clips": len(pos),
                         "negatives_firing": int((neg >= t).sum()), "negatives": len(neg)}
    return thresholds, report
