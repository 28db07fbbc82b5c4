"""Supervised fine-tuning: tag and keyword heads on one encoder, from a pretrained encoder or from scratch.

    python -m train.finetune --train ../shared/data/speech_commands --init runs/pre/encoder.safetensors --out runs/ft-kws
    python -m train.finetune --train esc50:../shared/data/esc50_other_folds --val esc50:../shared/data/esc50,folds=4 \\
        --train keywords=../shared/data/speech_commands --noise ../shared/data/background_noise --out runs/teacher

A source is `[HEAD=][READER:]PATH[,key=value]` (see train.data.read_examples); HEAD is `tags` or
`keywords` (Speech Commands defaults to keywords, everything else to tags). A head without a
--val source is validated on a split of its training data by speaker or source recording.
Each step trains every head on one batch of its own data; both heads share one encoder pass at
run time. `--mode` picks what is trained: `full`, `linear` (heads only) or `adapter` (heads and
bottleneck adapters beside a frozen encoder, AAT-style).

Writes into --out: `best.safetensors` (by the mean validation accuracy, or mAP for multi-label
data), `history.csv`, `curves.png`.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from edgetag import checkpoint
from edgetag.features import FbankConfig, hop_frames, normalize, preset, window_frames, windows
from edgetag.model import AudioTransformer, EncoderConfig, HeadConfig, num_parameters
from train.augment import AugmentConfig, augment, spec_augment
from train.data import Example, find_audio, labels_of, load_features, read_examples, split_examples
from train.evaluate import clip_scores, model_predict, primary, report, targets

MODES = ("full", "linear", "adapter")


@dataclass
class FinetuneConfig:
    train: list[str] = field(default_factory=list)  # sources, [HEAD=]SPEC
    val: list[str] = field(default_factory=list)
    out: str = "runs/finetune"
    init: str = ""  # an edgetag checkpoint (a pretrained encoder, or a model); "" trains from scratch
    size: str = "tiny"  # from scratch only
    tokens: str = "patch"
    preset: str = "ast"  # from scratch only; an init checkpoint brings its fbank
    mode: str = "full"
    adapter_dim: int = 32
    window: float = 1.0  # seconds the model sees per hop
    hop: float = 0.5  # between validation windows of long clips
    loudness: float = 1.0  # crop bias towards loud windows (see random_crops); 0: uniform
    val_percent: float = 10.0
    noise: list[str] = field(default_factory=list)  # background-noise folders or files
    epochs: int = 30
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    augment: dict = field(default_factory=lambda: asdict(AugmentConfig()))
    seed: int = 0


@dataclass
class Task:
    """One head and its data, features computed once."""

    head: str
    labels: list[str]
    train: list[torch.Tensor]
    train_y: torch.Tensor
    val: list[torch.Tensor]
    val_y: torch.Tensor


def parse_source(source: str) -> tuple[str, str]:
    """'[HEAD=]SPEC' -> (head, spec)."""
    head, sep, spec = source.partition("=")
    if sep and head in ("tags", "keywords"):
        return head, spec
    spec = source
    return ("keywords" if spec.startswith("speech_commands:") or Path(spec.split(",")[0]).name == "speech_commands" else "tags"), spec


def gather_sources(sources: list[str]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    for source in sources:
        head, spec = parse_source(source)
        out.setdefault(head, []).extend(read_examples(spec, head))
    return out


def build_tasks(c: FinetuneConfig, fbank: FbankConfig, labels: dict[str, list[str]] | None = None) -> list[Task]:
    """Read, split and featurise each head's data; `labels` fixes a head's classes (else the data's)."""
    train, val = gather_sources(c.train), gather_sources(c.val)
    tasks = []
    for head, examples in train.items():
        if head in val:
            train_examples, val_examples = examples, val[head]
        else:
            train_examples, val_examples = split_examples(examples, c.val_percent)
        head_labels = (labels or {}).get(head) or labels_of(train_examples)
        sets = []
        for name, subset in (("train", train_examples), ("val", val_examples)):
            subset = [e for e in subset if any(label in head_labels for label in e.labels)]
            feats = load_features(subset, fbank, description=f"{head} {name}")
            kept = [(e, f) for e, f in zip(subset, feats) if f is not None]
            if len(kept) < len(subset):
                print(f"{head} {name}: skipped {len(subset) - len(kept)} unreadable clip(s)")
            sets.append(([f for _, f in kept], targets([e for e, _ in kept], head_labels)))
        tasks.append(Task(head, head_labels, *sets[0], *sets[1]))
    return tasks


def noise_bank(sources: list[str], fbank: FbankConfig, frames: int) -> torch.Tensor | None:
    """Log-mel crops of the background-noise recordings, [n, 4 * frames, F]."""
    if not sources:
        return None
    crops = []
    for feats in load_features([Example(str(p), ()) for p in find_audio(sources)], fbank, description="noise"):
        if feats is not None and len(feats) >= 4 * frames:
            crops.extend(feats[i : i + 4 * frames] for i in range(0, len(feats) - 4 * frames + 1, 2 * frames))
    return torch.stack(crops) if crops else None


def random_crops(feats: list[torch.Tensor], index: list[int], frames: int, generator: torch.Generator, grid: int = 1,
                 loudness: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """One random `frames`-long crop of each clip (silence-padded when shorter), starting on a
    multiple of `grid` frames (distillation caches the teacher on that grid); and the starts.

    With `loudness` > 0 a start is drawn with probability proportional to exp(loudness x the
    window's mean log-mel): a 1 s window of a 5 s ESC-50 clip often holds only the quiet gap
    around the sound, and a label on silence teaches nothing but noise."""
    out, starts = [], []
    for i in index:
        x = feats[i]
        positions = 1 + max(0, -(-(len(x) - frames) // grid))  # the grid of `windows()`
        if loudness and positions > 1:
            level = torch.cat([torch.zeros(1), x.mean(1).cumsum(0)])  # running sum of frame levels
            ends = torch.clamp(torch.arange(positions) * grid + frames, max=len(x))
            score = (level[ends] - level[torch.arange(positions) * grid]) / (ends - torch.arange(positions) * grid)
            choice = int(torch.multinomial(torch.softmax(loudness * (score - score.max()), 0), 1, generator=generator))
        else:
            choice = int(torch.randint(0, positions, (1,), generator=generator))
        start = grid * choice
        out.append(windows(x[start:], frames, frames)[0])
        starts.append(start)
    return torch.stack(out), starts


def head_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE for tag heads, soft-target cross-entropy for keyword heads (targets may be mixed)."""
    if kind == "tags":
        return F.binary_cross_entropy_with_logits(logits, y)
    return -(y * logits.log_softmax(-1)).sum(-1).mean()


def build_model(c: FinetuneConfig, heads: dict[str, HeadConfig], fbank: FbankConfig | None = None) -> tuple[AudioTransformer, FbankConfig, dict]:
    """A model with these heads: encoder (and matching heads) from --init, or from scratch with
    `fbank` (default: the --preset)."""
    adapter_dim = c.adapter_dim if c.mode == "adapter" else 0
    if not c.init:
        encoder = EncoderConfig.named(c.size, tokens=c.tokens, adapter_dim=adapter_dim)
        return AudioTransformer(encoder, heads), fbank or preset(c.preset), {}
    source = checkpoint.load_model(c.init)
    if fbank is not None and fbank != source.fbank:
        raise ValueError(f"{c.init}: its fbank differs from the teacher's; distil from scratch or from an encoder trained on the same features")
    encoder = replace(source.encoder.config, adapter_dim=adapter_dim or source.encoder.config.adapter_dim)
    model = AudioTransformer(encoder, heads)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("heads.") or source.head_configs.get(k.split(".")[1]) == heads.get(k.split(".")[1])}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not (k.startswith("heads.") or ".adapter." in k) for k in missing):
        raise ValueError(f"{c.init}: encoder does not fit ({unexpected or missing})")
    return model, source.fbank, source.config.get("provenance", {})


def set_trainable(model: AudioTransformer, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    for name, p in model.named_parameters():
        p.requires_grad = mode == "full" or name.startswith("heads.") or (mode == "adapter" and ".adapter." in name)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def validate(model: AudioTransformer, tasks: list[Task], fbank: FbankConfig, frames: int, hop: int) -> dict[str, dict]:
    model.eval()
    results = {t.head: report(clip_scores(model_predict(model), t.val, t.head, fbank, frames, hop), t.val_y, t.labels) for t in tasks}
    model.train()
    return results


def plot_history(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    for key in rows[0]:
        if key.endswith("_loss"):
            left.plot(epochs, [r[key] for r in rows], label=key)
        elif key.startswith("val_"):
            right.plot(epochs, [r[key] for r in rows], label=key)
    left.set_xlabel("epoch")
    left.set_title("training loss")
    left.legend()
    right.set_xlabel("epoch")
    right.set_title("validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune(c: FinetuneConfig, device: str | None = None, teacher=None) -> dict:
    """Train; returns the best validation results. With a `teacher` (train.distill.Teacher) the
    heads take its classes and features, and each head's loss mixes the hard labels with the
    teacher's soft targets."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(c.seed)
    generator = torch.Generator().manual_seed(c.seed)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)

    # the heads' classes must be known before the model: read the data with the init's fbank
    if teacher is not None:
        data_fbank = teacher.fbank
    elif c.init:
        data_fbank = FbankConfig.from_dict(checkpoint.read_config(c.init)["fbank"])
    else:
        data_fbank = preset(c.preset)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tasks = build_tasks(c, data_fbank, labels=teacher.labels if teacher else None)
    heads = {t.head: HeadConfig(t.head, t.labels) for t in tasks}
    model, fbank, provenance = build_model(c, heads, teacher.fbank if teacher else None)
    set_trainable(model, c.mode)
    model.to(device)
    frames, hop = window_frames(c.window, fbank), hop_frames(c.hop, fbank)
    noise = noise_bank(c.noise, fbank, frames)
    augmentation = AugmentConfig(**c.augment)
    if teacher is not None:
        teacher.prepare(tasks, frames, hop)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    steps_per_epoch = max(math.ceil(len(t.train) / c.batch_size) for t in tasks)
    total, warmup = c.epochs * steps_per_epoch, round(c.warmup_epochs * steps_per_epoch)
    trainable = sum(p.numel() for p in params)
    print(f"{c.mode}: training {trainable:,} of {num_parameters(model):,} parameters ({100 * trainable / num_parameters(model):.1f}%); "
          + "; ".join(f"{t.head}: {len(t.train)} train / {len(t.val)} val clips, {len(t.labels)} classes" for t in tasks))

    rows, best, best_results, step = [], -1.0, {}, 0
    columns = [TextColumn("[bold]finetune"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"), TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    model.train()
    with Progress(*columns) as progress:
        bar = progress.add_task("finetune", total=total, epoch=0, stats="")
        for epoch in range(1, c.epochs + 1):
            start = time.perf_counter()
            orders = [torch.randperm(len(t.train), generator=generator).tolist() for t in tasks]
            losses = {t.head: 0.0 for t in tasks}
            for i in range(steps_per_epoch):
                for group in optimizer.param_groups:
                    group["lr"] = c.lr * lr_factor(step, warmup, total)
                loss = 0.0
                for t, order in zip(tasks, orders):
                    index = [order[(i * c.batch_size + j) % len(order)] for j in range(c.batch_size)]
                    x, starts = random_crops(t.train, index, frames, generator, grid=hop if teacher else 1, loudness=c.loudness)
                    y = t.train_y[index]
                    if teacher is not None:  # the teacher's view of these windows rides along, mixed as the labels are
                        y = torch.cat([y, teacher.soft_targets(t.head, index, starts, hop)], dim=1)
                    x, y = augment(x, y, augmentation, generator, noise)
                    x = spec_augment(normalize(x, fbank), augmentation.freq_mask, augmentation.time_mask, generator)
                    logits = model(x.to(device))[t.head]
                    task_loss = teacher.loss(t.head, logits, y.to(device)) if teacher else head_loss(logits, y.to(device), t.head)
                    losses[t.head] += task_loss.item() / steps_per_epoch
                    loss = loss + task_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 5.0)
                optimizer.step()
                step += 1
                progress.update(bar, completed=step, epoch=epoch, stats=" ".join(f"{h} {v * steps_per_epoch / (i + 1):.3f}" for h, v in losses.items()))
            results = validate(model, tasks, fbank, frames, hop)
            score = sum(primary(r) for r in results.values()) / len(results)
            figures = {f"val_{h}_{k}": r[k] for h, r in results.items() for k in ("accuracy", "macro_f1", "mAP") if k in r}
            row = {"epoch": epoch, **{f"{h}_loss": v for h, v in losses.items()}, **figures, "seconds": time.perf_counter() - start}
            rows.append(row)
            progress.console.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            if score >= best:  # on a tie the later, longer-trained epoch wins
                best, best_results = score, results
                checkpoint.save(out / "best.safetensors", model, fbank, stream={"window": c.window, "hop": c.hop},
                                provenance={"stage": "distill" if teacher else "finetune", "epoch": epoch, "config": asdict(c),
                                            "validation": {h: {k: r[k] for k in ("n", "accuracy", "macro_f1", "mAP") if k in r} for h, r in results.items()},
                                            "init": provenance, **({"teacher": teacher.settings()} if teacher else {})})

    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_history(rows, out / "curves.png")
    summary = "; ".join(f"{h}: " + " ".join(f"{k} {r[k]:.4f}" for k in ("accuracy", "macro_f1", "mAP") if k in r) for h, r in best_results.items())
    print(f"{out / 'best.safetensors'}: best validation {summary}")
    return best_results


def config_from_cli(**options) -> FinetuneConfig:
    """Options named as FinetuneConfig's fields; augmentation options go into its dict."""
    aug = {k: options.pop(k) for k in list(options) if k in AugmentConfig.__dataclass_fields__}
    if options.pop("no_augment", False):
        aug = asdict(AugmentConfig.off())
    return FinetuneConfig(**options, augment={**asdict(AugmentConfig()), **aug})


def main(
    train: list[str] = typer.Option(..., help="Training source [HEAD=][READER:]PATH[,key=value]; repeatable."),
    val: list[str] = typer.Option([], help="Validation source, as --train; default: a split of the training data."),
    out: str = typer.Option("runs/finetune"),
    init: str = typer.Option("", help="Start from this edgetag checkpoint (e.g. a pretrained encoder.safetensors); default: from scratch."),
    size: str = typer.Option("tiny", help="Model size when training from scratch."),
    tokens: str = typer.Option("patch"),
    preset_name: str = typer.Option("ast", "--preset", help="Fbank recipe when training from scratch."),
    mode: str = typer.Option("full", help="full, linear (heads only) or adapter (frozen encoder + adapters)."),
    adapter_dim: int = typer.Option(32),
    window: float = typer.Option(1.0, help="Seconds per window."),
    hop: float = typer.Option(0.5, help="Seconds between validation windows."),
    loudness: float = typer.Option(1.0, help="Bias training crops towards loud windows (0: uniform)."),
    val_percent: float = typer.Option(10.0, help="Share of speakers/sources held out when a head has no --val."),
    noise: list[str] = typer.Option([], help="Background-noise folders or files for augmentation."),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(5e-4),
    weight_decay: float = typer.Option(0.05),
    mixup: float = typer.Option(0.5, help="Probability of mixup per clip."),
    freq_mask: int = typer.Option(24),
    time_mask: int = typer.Option(24),
    no_augment: bool = typer.Option(False, "--no-augment", help="Switch all augmentation off."),
    seed: int = typer.Option(0),
) -> None:
    options = locals()
    options["preset"] = options.pop("preset_name")
    finetune(config_from_cli(**options))


if __name__ == "__main__":
    typer.run(main)
