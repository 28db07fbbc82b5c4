"""Supervised fine-tuning: tag and keyword heads on one encoder, from a pretrained encoder or from scratch.

    python -m train.finetune --train ../shared/data/speech_commands --init runs/pre/encoder.safetensors --out runs/ft-kws
    python -m train.finetune --train esc50:../shared/data/esc50_other_folds --val esc50:../shared/data/esc50,folds=4 \\
        --train keywords=../shared/data/speech_commands --noise ../shared/data/background_noise --out runs/teacher

A source is `[HEAD=][READER:]PATH[,key=value]` (`train.data.Source`). A head without a --val
source is validated on a split of its training data by speaker or source recording. Each step
trains every head on one batch of its own data; both heads share one encoder pass at run time.
`--mode` picks what is trained: `full`, `linear` (heads only) or `adapter` (heads and
adapters in a frozen encoder: `--adapter mlp`, a bottleneck beside each MLP; `aat`, AAT's
placement; `conv`, TI-CL's convolutional adapters). `--attention fta` runs the encoder's blocks
under frequency-time factorised attention (no new weights: an --init encoder runs as it is).

`--task NAME` adds a task to the --init model instead (TI-CL's task-incremental learning): the
one head of --train becomes the task's head under NAME, trained with its own adapters in the last
`--adapter-layers` blocks (`--mode adapter`) or as a linear probe (`--mode linear`), while the base
and the model's other tasks stay byte-identical (batch norms keep their running statistics);
OUT/best.safetensors is --init plus the task.

The loop is the same for distillation: `train(config, targets)` takes what each head learns
from, `HardLabels` here (its clips' labels), a teacher's soft targets in train.distill. Writes
into --out: `best.safetensors` (by the mean validation accuracy, or mAP for multi-label data),
`history.csv`, `curves.png`.
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from edgetag import checkpoint
from edgetag.features import PRESETS, FbankConfig, normalize, preset, windows
from edgetag.model import AudioTransformer, num_parameters
from edgetag.runtime import TorchBackend
from edgetag.spec import ADAPTERS, ATTENTIONS, ENCODERS, NOT_SPOTTED, TAGS, TOKENS, EncoderConfig, HeadConfig, ModelSpec, SpecError, StreamConfig, TaskConfig, sizes_of
from train.augment import AugmentConfig, augment, spec_augment
from train.data import Example, Source, find_audio, labels_of, load_features, split_examples
from train.evaluate import FIGURES, clip_scores, headline, primary, report, targets
from train.labels import columns
from train.options import bounded, choose, command, setting

MODES = ("full", "linear", "adapter")
PRECISIONS = ("fp32", "bf16")


@dataclass
class FinetuneConfig:
    train: list[str] = setting([], "Training source [HEAD=][READER:]PATH[,key=value] (train.data.Source); repeatable.", required=True)
    val: list[str] = setting([], "Validation source, as --train; a head without one is validated on a split of its training data.")
    out: str = setting("runs/finetune", "Folder for best.safetensors, history.csv and curves.png.")
    init: str = setting("", "Start from this edgetag checkpoint (a pretrained encoder.safetensors, or a model); empty: from scratch.")
    encoder: str = setting("transformer", f"Encoder from scratch: {' or '.join(ENCODERS)}.")
    size: str = setting("tiny", "Encoder size from scratch: nano, mini, tiny, small, base (mamba: also ssamba-tiny/-small/-base, 24 layers).")
    tokens: str = setting("patch", "patch, frame or conv tokens, from scratch.")
    preset: str = setting("ast", "Fbank recipe from scratch (an --init checkpoint brings its own).")
    mode: str = setting("full", "full, linear (heads only) or adapter (adapters in a frozen encoder, --adapter).")
    adapter: str = setting("mlp", "Adapters of --mode adapter: mlp (a bottleneck beside each MLP), aat (AAT's: one after attention in sequence, one beside the MLP) or conv (TI-CL's ConvPass beside attention and the MLP).")
    adapter_dim: int = setting(32, "Adapter bottleneck width (--mode adapter; AAT's ratio 0.25 is a quarter of the encoder's width).")
    attention: str = setting("", "full or fta (TI-CL's frequency-time factorised attention); empty: full from scratch, the --init encoder's otherwise.")
    task: str = setting("", "Add a task of this name to the --init model (--mode linear or adapter), its head trained on the one head of --train; the base and its other tasks stay as they are.")
    adapter_layers: int = setting(0, "A --task's adapters go in this many of the last blocks (0: every block); the blocks before them are shared with the base at run time.")
    stream: StreamConfig = setting(StreamConfig(), "The window the model reads, and the hop between validation windows.")
    loudness: float = setting(1.0, "Bias training crops towards loud windows (0: uniform).")
    val_percent: float = setting(10.0, "Share of speakers/sources held out when a head has no --val.")
    noise: list[str] = setting([], "Background-noise folders or files for augmentation.")
    epochs: int = setting(30, "Passes over the largest head's training data.")
    batch_size: int = setting(64, "Clips per head per step.")
    lr: float = setting(5e-4, "Peak learning rate (AdamW; warm-up, then cosine decay).")
    weight_decay: float = setting(0.05, "AdamW weight decay.")
    warmup_epochs: float = setting(1.0, "Epochs of linear warm-up.")
    augment: AugmentConfig = setting(AugmentConfig(), "Augmentation of the log-mel batches.")
    balance: bool = setting(False, "Draw tag clips class-balanced: a clip as often as its rarest class allows, so a class with three times the clips is not heard three times as often.")
    keyword_share: float = setting(0.0, "Share of a keyword head's draws that hold a keyword (the rest: its _unknown_ and _silence_ clips, in their own proportions), however many clips of either it has; 0: the data's own mix.")
    precision: str = setting("fp32", "fp32, or bf16 autocast (1.4x faster steps on a CPU core with AVX512-BF16, as on CUDA GPUs).")
    seed: int = setting(0, "Seed of the splits' crops, the augmentation and the initial weights.")

    def __post_init__(self):
        for name, allowed in (("encoder", ENCODERS), ("size", sizes_of(self.encoder)), ("tokens", TOKENS), ("preset", PRESETS), ("mode", MODES), ("precision", PRECISIONS),
                              ("adapter", ADAPTERS)):
            choose(name, getattr(self, name), allowed)
        if self.attention:  # empty: the --init encoder's
            choose("attention", self.attention, ATTENTIONS)
        if self.mode == "adapter":
            bounded(self, ("adapter_dim", self.adapter_dim >= 1, ">= 1"))
        bounded(self, ("adapter_layers", self.adapter_layers >= 0, ">= 0"), ("keyword_share", 0 <= self.keyword_share < 1, "in [0, 1)"),
                ("seed", self.seed >= 0, ">= 0"))  # numpy's generators take no negative seed
        if self.task:
            for wrong, why in ((not self.init, "needs --init, the model it adds to"), (self.mode == "full", "trains a task's own weights: --mode linear or adapter"),
                               (bool(self.attention), "runs the base's attention; leave out --attention")):
                if wrong:
                    raise ValueError(f"--task {self.task}: {why}")
        if not self.init:  # an encoder that cannot be built fails here, before any data is read
            EncoderConfig.named(self.size, encoder=self.encoder, tokens=self.tokens, **self.encoder_overrides())

    def task_config(self, head: HeadConfig, depth: int) -> TaskConfig:
        """The task of --task: `head` and, with --mode adapter, its adapters."""
        if self.mode == "linear":
            return TaskConfig(head)
        return TaskConfig(head, self.adapter, self.adapter_dim, self.adapter_layers or depth)

    def encoder_overrides(self) -> dict:
        """What this run changes in an encoder's config: its adapters, its attention."""
        adapters = {"adapter_dim": self.adapter_dim, "adapter": self.adapter} if self.mode == "adapter" else {}
        return {**adapters, **({"attention": self.attention} if self.attention else {})}


@dataclass
class Task:
    """One head and its data, features computed once."""

    head: str
    labels: list[str]
    train: list[torch.Tensor]
    train_y: torch.Tensor
    val: list[torch.Tensor]
    val_y: torch.Tensor
    examples: list[Example] = field(default_factory=list)  # what `train` was computed from (distillation may render it anew)


# ---------------------------------------------------------------------------------------------
# Data


def gather(sources: list[str]) -> dict[str, list[Example]]:
    """Each head's examples from its sources."""
    out: dict[str, list[Example]] = {}
    for source in map(Source.parse, sources):
        out.setdefault(source.head, []).extend(source.read())
    return out


def build_tasks(c: FinetuneConfig, fbank: FbankConfig, labels: dict[str, list[str]] | None = None) -> list[Task]:
    """Read, split and featurise each head's data; `labels` fixes a head's classes (else the data's)."""
    train, val = gather(c.train), gather(c.val)
    tasks = []
    for head, examples in train.items():
        train_examples, val_examples = (examples, val[head]) if head in val else split_examples(examples, c.val_percent)
        head_labels = (labels or {}).get(head) or labels_of(train_examples)
        sides = {}  # name -> (features, examples) of the readable clips
        for name, subset in (("train", train_examples), ("val", val_examples)):
            subset = [e for e in subset if any(label in head_labels for label in e.labels)]
            feats = load_features(subset, fbank, description=f"{head} {name}")
            kept = [(e, f) for e, f in zip(subset, feats) if f is not None]
            if len(kept) < len(subset):
                print(f"{head} {name}: skipped {len(subset) - len(kept)} unreadable clip(s)")
            sides[name] = ([f for _, f in kept], [e for e, _ in kept])
        (train_x, train_e), (val_x, val_e) = sides["train"], sides["val"]
        for name, kept, chosen in (("training", train_x, train_examples), ("validation", val_x, val_examples)):
            if not kept:  # all unreadable, or every group of a small source fell on one side of the split
                split = "" if head in val else f"; --val-percent {c.val_percent:g} holds out groups by hash, of {len(examples)} clips"
                raise ValueError(f"{head}: no readable {name} clips ({len(chosen)} listed{split})")
        tasks.append(Task(head, head_labels, train_x, targets(train_e, head_labels), val_x, targets(val_e, head_labels), train_e))
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
        out.append(torch.from_numpy(windows(x[start:], frames, frames)[0]))
        starts.append(start)
    return torch.stack(out), starts


# ---------------------------------------------------------------------------------------------
# The model and what it learns from


def head_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """BCE for tag heads, soft-target cross-entropy for keyword heads (targets may be mixed)."""
    if kind == TAGS:
        return F.binary_cross_entropy_with_logits(logits, y)
    return -(y * logits.log_softmax(-1)).sum(-1).mean()


class HardLabels:
    """What plain fine-tuning learns from: each head, the labels of its clips. The training loop
    asks a targets strategy for the fbank and classes it imposes (none here), prepares it once
    the model exists, crops on its grid, and trains each head on its targets and loss."""

    stage = "finetune"
    fbank: FbankConfig | None = None
    labels: dict[str, list[str]] | None = None
    parents: dict[str, dict[str, tuple[str, ...]]] = {}  # per head, each class's broader classes (HeadConfig.parents)

    def prepare(self, tasks: list[Task], spec: ModelSpec) -> None:
        pass

    def grid(self, spec: ModelSpec) -> int:
        """Training crops start on multiples of this many frames."""
        return 1

    def targets(self, task: Task, index: list[int], starts: list[int]) -> torch.Tensor:
        """What augmentation mixes alongside the crops (mixup mixes targets as it mixes clips)."""
        return task.train_y[index]

    def loss(self, head: HeadConfig, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return head_loss(logits, y, head.kind)

    def cross_loss(self, spec: ModelSpec, head: str, logits: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor | float:
        """What the other heads learn from `head`'s rows (their `logits`), `y` being those rows' targets: nothing here."""
        return 0.0

    def provenance(self) -> dict:
        return {}


def build_model(c: FinetuneConfig, heads: dict[str, HeadConfig], fbank: FbankConfig) -> AudioTransformer:
    """A model with these heads reading `fbank`: the encoder from --init, whose provenance it
    keeps under "init", or from scratch. A head of --init's with the same name and kind lends
    its norm and the rows of every class the new head shares with it (`carry_head`). With
    --task, the --init model whole, and the one head as a new task."""
    if c.task:
        return add_task(c, heads)
    if not c.init:
        encoder = EncoderConfig.named(c.size, encoder=c.encoder, tokens=c.tokens, n_mels=fbank.n_features, **c.encoder_overrides())
        return AudioTransformer(ModelSpec(encoder, fbank, heads, c.stream, provenance={"init": {}}))
    source = checkpoint.load_model(c.init)
    if fbank != source.spec.fbank:
        raise ValueError(f"{c.init}: its fbank differs from the teacher's; distil from scratch or from an encoder trained on the same features")
    encoder = replace(source.spec.encoder, **c.encoder_overrides())
    model = AudioTransformer(ModelSpec(encoder, fbank, heads, c.stream, provenance={"init": source.spec.provenance}))
    missing, unexpected = model.load_state_dict({k: v for k, v in source.state_dict().items() if not k.startswith("heads.")}, strict=False)
    if unexpected or any(not (k.startswith("heads.") or is_adapter(k)) for k in missing):
        raise ValueError(f"{c.init}: encoder does not fit ({unexpected or missing})")
    for name, head in heads.items():
        old = source.spec.heads.get(name)
        if old is not None and old.kind == head.kind:
            carry_head(source.heads[name], old.labels, model.heads[name], head.labels)
    return model


def add_task(c: FinetuneConfig, heads: dict[str, HeadConfig]) -> AudioTransformer:
    """--init's model (every weight as it was) with a fresh task --task for the one head."""
    if len(heads) != 1:
        raise ValueError(f"--task {c.task}: trains one head; --train names {', '.join(heads)}")
    source = checkpoint.load_model(c.init)
    if c.task in source.spec.tasks:
        raise ValueError(f"--task {c.task}: {c.init} has that task already; choose another name")
    (head,) = heads.values()
    try:
        spec = replace(source.spec, tasks={**source.spec.tasks, c.task: c.task_config(head, source.spec.encoder.depth)})
    except (SpecError, ValueError) as e:
        raise ValueError(f"--task {c.task}: {e}") from e
    model = AudioTransformer(spec)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(f"tasks.{c.task}.") for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def carry_head(source: torch.nn.Module, source_labels: tuple[str, ...], head: torch.nn.Module, labels: tuple[str, ...]) -> None:
    """Copy `source`'s norm and, class by class, its output rows into `head`; classes it lacks
    keep their fresh rows. A 57-class tag head grown to AudioSet's 527 keeps what it knew, so a
    short schedule spends itself on the new classes."""
    head.norm.load_state_dict(source.norm.state_dict())
    mine, theirs = columns(source_labels, labels)
    head.fc.weight[mine] = source.fc.weight[theirs]
    head.fc.bias[mine] = source.fc.bias[theirs]


def is_adapter(name: str) -> bool:
    """An adapter's parameter (`blocks.3.adapter.up.weight`, `blocks.3.adapter_attn.conv.bias`)."""
    return ".adapter." in name or ".adapter_attn." in name


def set_trainable(model: AudioTransformer, mode: str, task: str = "") -> None:
    choose("mode", mode, MODES)
    for name, p in model.named_parameters():
        if task:
            p.requires_grad = name.startswith(f"tasks.{task}.")
        else:
            p.requires_grad = mode == "full" or name.startswith("heads.") or (mode == "adapter" and is_adapter(name))


def train_mode(model: AudioTransformer) -> None:
    """model.train(), but batch norms whose weights are frozen keep their running statistics:
    a frozen conv stem otherwise drifts towards the new data, and a frozen base (a --task's)
    would not stay byte-identical."""
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class Run:
    """What `setup` builds and the loop works on."""

    model: AudioTransformer
    tasks: list[Task]
    noise: torch.Tensor | None
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    steps_per_epoch: int
    generator: torch.Generator
    device: str

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec


def setup(c: FinetuneConfig, learn: HardLabels, device: str) -> Run:
    """Data, model and optimizer; the heads' classes come from the data (or the targets strategy),
    the fbank from the strategy, else --init, else --preset."""
    torch.manual_seed(c.seed)
    fbank = learn.fbank or (checkpoint.read_spec(c.init).fbank if c.init else preset(c.preset))
    c.stream.frames(fbank)  # a window or hop off the frame grid fails here, before the data is read
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        tasks = build_tasks(c, fbank, learn.labels)
    model = build_model(c, {t.head: HeadConfig(t.head, t.labels, learn.parents.get(t.head, {})) for t in tasks}, fbank)
    if c.task:  # the head's data and outputs go by the task's name
        tasks[0].head = c.task
    set_trainable(model, c.mode, c.task)
    model.to(device)
    learn.prepare(tasks, model.spec)
    params = [p for p in model.parameters() if p.requires_grad]
    run = Run(model, tasks, noise_bank(c.noise, fbank, model.spec.window_frames), params,
              torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay),
              max(math.ceil(len(t.train) / c.batch_size) for t in tasks), torch.Generator().manual_seed(c.seed), device)
    trainable, total = sum(p.numel() for p in params), num_parameters(model)
    print(f"{c.mode}: training {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%); "
          + "; ".join(f"{t.head}: {len(t.train)} train / {len(t.val)} val clips, {len(t.labels)} classes" for t in tasks))
    return run


def train_step(run: Run, c: FinetuneConfig, learn: HardLabels, orders: list[list[int]], i: int) -> dict[str, float]:
    """One optimizer step: every head on one batch of its own data, all batches through one
    encoder pass (so a conv stem's batch norms see the mixture they meet at run time, not one
    head's audio at a time). Returns each head's loss."""
    spec, inputs, targets = run.spec, [], []
    for t, order in zip(run.tasks, orders):
        index = [order[(i * c.batch_size + j) % len(order)] for j in range(c.batch_size)]
        x, starts = random_crops(t.train, index, spec.window_frames, run.generator, grid=learn.grid(spec), loudness=c.loudness)
        x, y = augment(x, learn.targets(t, index, starts), c.augment, run.generator, run.noise)
        inputs.append(spec_augment(normalize(x, spec.fbank), c.augment.freq_mask, c.augment.time_mask, run.generator))
        targets.append(y)
    with torch.autocast(torch.device(run.device).type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
        out = run.model(torch.cat(inputs).to(run.device), tuple(t.head for t in run.tasks))
    losses, loss = {}, 0.0
    for k, (t, y) in enumerate(zip(run.tasks, targets)):
        rows = slice(k * c.batch_size, (k + 1) * c.batch_size)
        y = y.to(run.device)
        task_loss = learn.loss(spec.outputs[t.head], out[t.head][rows].float(), y)
        losses[t.head] = task_loss.item()
        loss = loss + task_loss + learn.cross_loss(spec, t.head, {h: o[rows].float() for h, o in out.items() if h != t.head}, y)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, 5.0)
    run.optimizer.step()
    return losses


def validate(model: AudioTransformer, tasks: list[Task]) -> dict[str, dict]:
    """Each head on its validation clips, windowed as the streaming engine windows them, among
    the classes its validation clips have (a 527-class tag head is scored 57-way on ESC-50 and
    DCASE, as it was trained to tell their classes apart)."""
    model.eval()
    backend = TorchBackend(model, tasks=tuple(t.head for t in tasks if t.head in model.spec.tasks))
    results = {}
    for t in tasks:
        present = (t.val_y.sum(0) > 0).numpy()
        scores = clip_scores(backend, t.val, t.head)[:, present]
        results[t.head] = report(scores, t.val_y[:, present], [label for label, p in zip(t.labels, present) if p])
    train_mode(model)
    return results


def save_best(run: Run, c: FinetuneConfig, learn: HardLabels, epoch: int, results: dict[str, dict]) -> None:
    """best.safetensors, its provenance (a --task's: the task's): the stage, the epoch, the
    settings, what it scored."""
    if c.task:
        task = replace(run.spec.tasks[c.task], provenance={"stage": learn.stage, "epoch": epoch, "config": asdict(c), "validation": headline(results)})
        run.model.spec = replace(run.spec, tasks={**run.spec.tasks, c.task: task})
    else:
        run.model.spec = replace(run.spec, provenance={"stage": learn.stage, "epoch": epoch, "config": asdict(c), "validation": headline(results),
                                                       "init": run.spec.provenance["init"], **learn.provenance()})
    checkpoint.save(Path(c.out) / "best.safetensors", run.model)


def write_history(rows: list[dict], out: Path) -> None:
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot_history(rows, out / "curves.png")


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


def epoch_order(task: Task, balance: bool, generator: torch.Generator, keyword_share: float = 0.0) -> list[int]:
    """One epoch's clips: a permutation; or as many draws with replacement, each clip weighted by
    1 / the clip count of its rarest class (balance: every class drawn about equally), or so that
    `keyword_share` of them hold a keyword (a keyword head that has clips with and without one)."""
    n = len(task.train)
    if keyword_share:
        keyword = (task.train_y[:, [label not in NOT_SPOTTED for label in task.labels]] > 0).any(1)  # [n]
        k = int(keyword.sum())
        if 0 < k < n:
            weight = torch.where(keyword, keyword_share / k, (1 - keyword_share) / (n - k))
            return torch.multinomial(weight, n, replacement=True, generator=generator).tolist()
    if not balance:
        return torch.randperm(n, generator=generator).tolist()
    labelled = task.train_y > 0  # [n, classes]
    per_class = labelled.sum(0).clamp_min(1).float()
    weight = torch.where(labelled, 1 / per_class, torch.zeros(())).amax(1)  # [n]: the rarest class's share
    weight = torch.where(weight > 0, weight, weight[weight > 0].mean() if (weight > 0).any() else torch.ones(()))  # an unlabelled clip: an average one
    return torch.multinomial(weight, n, replacement=True, generator=generator).tolist()


def train(c: FinetuneConfig, learn: HardLabels, device: str | None = None) -> dict[str, dict]:
    """Train heads (and, by --mode, the encoder) on `learn`'s targets; keeps the best epoch and
    returns its validation results."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    Path(c.out).mkdir(parents=True, exist_ok=True)
    run = setup(c, learn, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    total = c.epochs * run.steps_per_epoch
    warmup, step, rows, best, best_results = round(c.warmup_epochs * run.steps_per_epoch), 0, [], -1.0, {}
    columns = [TextColumn(f"[bold]{learn.stage}"), BarColumn(), TextColumn("epoch {task.fields[epoch]}"), TextColumn("{task.fields[stats]}"), TimeRemainingColumn()]
    train_mode(run.model)
    with Progress(*columns) as progress:
        bar = progress.add_task(learn.stage, total=total, epoch=0, stats="")
        for epoch in range(1, c.epochs + 1):
            start, losses = time.perf_counter(), []
            orders = [epoch_order(t, c.balance and run.spec.outputs[t.head].kind == TAGS, run.generator,
                                  c.keyword_share if run.spec.outputs[t.head].kind != TAGS else 0.0) for t in run.tasks]
            for i in range(run.steps_per_epoch):
                for group in run.optimizer.param_groups:
                    group["lr"] = c.lr * lr_factor(step, warmup, total)
                losses.append(train_step(run, c, learn, orders, i))
                step += 1
                progress.update(bar, completed=step, epoch=epoch, stats=" ".join(f"{h} {np.mean([x[h] for x in losses]):.3f}" for h in losses[0]))
            results = validate(run.model, run.tasks)
            figures = {f"val_{h}_{k}": r[k] for h, r in results.items() for k in FIGURES[1:] if k in r}
            rows.append({"epoch": epoch, **{f"{h}_loss": float(np.mean([x[h] for x in losses])) for h in losses[0]}, **figures,
                         "seconds": time.perf_counter() - start})
            progress.console.print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
            score = sum(primary(r) for r in results.values()) / len(results)
            if score >= best:  # on a tie the later, longer-trained epoch wins
                best, best_results = score, results
                save_best(run, c, learn, epoch, results)
    write_history(rows, Path(c.out))
    summary = "; ".join(f"{h}: " + " ".join(f"{k} {r[k]:.4f}" for k in FIGURES[1:] if k in r) for h, r in best_results.items())
    print(f"{Path(c.out) / 'best.safetensors'}: best validation {summary}")
    return best_results


def finetune(c: FinetuneConfig, device: str | None = None) -> dict[str, dict]:
    """Fine-tune tag and keyword heads on labelled audio, from a pretrained encoder (--init) or
    from scratch; the best epoch goes to OUT/best.safetensors."""
    return train(c, HardLabels(), device)


main = command(FinetuneConfig, finetune)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
