"""What a model needs to run besides its weights, in one typed object: `ModelSpec`.

The encoder, the fbank recipe its inputs are computed with, its heads and their labels, the
stream settings (a `window` of audio every `hop`, in seconds), calibrated thresholds and
provenance. Seconds become frames here and nowhere else (`StreamConfig.frames`): once, when the
spec is made, checked against the fbank's frame grid (a hop between two frames is an error, not
a rounding).

A spec may also hold tasks (`TaskConfig`, TI-CL's task-incremental learning): heads added to
the frozen base later, each with its own adapters, labels and thresholds. `outputs` names every
head a model can answer with; `select(tasks)` is the spec of one run's choice of them.

Checkpoints carry the spec in their header and exports in manifest.json, as the plain dict of
`to_dict()`; `from_dict()` also reads format 1, whose thresholds were one dict for all heads.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from edgetag.features import FbankConfig

FORMAT = "edgetag/2"
FORMAT_1 = "edgetag/1"  # thresholds {label: value} for all heads together; "stream" optional


class SpecError(ValueError):
    """A spec that cannot describe a runnable model (a hop off the frame grid, an unknown format...)."""


# ---------------------------------------------------------------------------------------------
# The encoder and its heads

# Token encoders (what masked and contrastive pretraining, FTA and adapters work on),
# EfficientAT's MobileNetV3, a CNN over the whole window (edgetag.mobilenet), and MAST, a
# multiscale transformer whose stages pool the token grid (edgetag.mast)
TOKEN_ENCODERS = ("transformer", "mamba")
ENCODERS = (*TOKEN_ENCODERS, "mobilenet", "mast")
TOKENS = ("patch", "frame", "conv")
POSITIONS = ("sincos", "learned")
POOLS = ("mean", "cls")
ATTENTIONS = ("full", "fta")
ADAPTERS = ("mlp", "aat", "conv")

# Named sizes: SSAST's tiny/small/base, plus smaller students for the edge.
SIZES = {
    "nano": dict(width=64, depth=4, heads=2),
    "mini": dict(width=128, depth=6, heads=4),
    "tiny": dict(width=192, depth=12, heads=3),
    "small": dict(width=384, depth=12, heads=6),
    "base": dict(width=768, depth=12, heads=12),
}
# Mamba encoders: a block (no MLP) has about half a transformer block's parameters at equal
# width, so the same names are as wide and deep enough to match the transformer's parameter
# count (within 5%, tested); the ssamba-* sizes are SSAMBA's, 24 layers at every width. `heads`
# only sizes a masked-pretraining decoder.
MAMBA_SIZES = {
    **{name: {**SIZES[name], "depth": depth} for name, depth in (("nano", 5), ("mini", 9), ("tiny", 19), ("small", 20), ("base", 21))},
    **{f"ssamba-{name}": {**SIZES[name], "depth": 24} for name in ("tiny", "small", "base")},
}


# MobileNets by EfficientAT's names: mnXX is width_mult 0.XX; `width` is its projection's,
# divisible(1280 * width_mult) (checked). mn04 is the AudioSet model in ../shared/teachers.
MOBILENET_SIZES = {"mn04": dict(width=512, width_mult=0.4, depth=15, heads=1)}


# MAST by the paper's names (blocks per stage; `width` and `heads` are the last stage's, each stage
# before it half as wide with half the heads: 96 -> 768, 1 -> 8 heads), and one for the edge with
# about the bundled model's parameter count.
MAST_SIZES = {
    "mast-t": dict(width=768, heads=8, stages=(1, 2, 5, 2), depth=10),
    "mast-s": dict(width=768, heads=8, stages=(1, 2, 11, 2), depth=16),
    "mast-edge": dict(width=160, heads=8, stages=(1, 2, 5, 2), depth=10),
}
MAST_PATCH = (7, 10)  # the patch embedding's kernel and stride (freq and time): a token per 10 frames and 10 bands
MAST_KV_STRIDE = 4  # keys and values pooled by this in the first stage, halved at each stage after


def strided(n: int, stride: int) -> int:
    """Rows an odd kernel padded by half its width leaves of n at `stride`: ceil(n / stride)."""
    return (n - 1) // stride + 1


def mast_grid(n: int) -> int:
    """Rows of the patch embedding's output for n input rows (kernel 7, stride 10, padding 3)."""
    return strided(n, MAST_PATCH[1])


def sizes_of(encoder: str) -> dict[str, dict]:
    """The named sizes of an encoder kind."""
    return {"mamba": MAMBA_SIZES, "mobilenet": MOBILENET_SIZES, "mast": MAST_SIZES}.get(encoder, SIZES)


def divisible(v: float, divisor: int = 8) -> int:
    """MobileNet's channel rule: a multiple of 8, never more than 10% below v."""
    rounded = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * v else rounded


@dataclass(frozen=True)
class EncoderConfig:
    n_mels: int = 128  # features per frame: mel bins, or MFCCs
    encoder: str = "transformer"  # the blocks: "transformer" (attention + MLP) or "mamba" (SSAMBA's bidirectional Mamba)
    # "patch": 16x16 (freq x time); "frame": n_mels x 2; "conv": a stem of four stride-2 3x3
    # convolutions, one token per 16x16 cell like a patch, each seeing past its cell's edges
    tokens: str = "patch"
    width: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    positions: str = "sincos"
    max_tokens: int = 4096  # rows of a learned position table
    norm_first: bool = True  # pre-LN; False is the post-LN stack of MAE-AST's released weights
    norm_eps: float = 1e-6
    # What imported AST/SSAST teachers need: overlapping patches (stride < patch size, e.g. 10) and
    # cls/distillation tokens. Their frequency-major token order becomes time-major on import
    # (position rows permuted alike), which leaves every output unchanged.
    stride_freq: int = 0  # 0: the patch height (no overlap)
    stride_time: int = 0  # 0: the patch width
    cls_tokens: int = 0
    pool: str = "mean"  # "mean" of the patch tokens, or of the "cls" tokens
    # Self-attention over every token, or TI-CL's frequency-time factorised attention: a patch
    # attends to its frequency row and its time column (and the cls tokens), F + T keys, not F x T.
    # FTA has no weights of its own: a full-attention encoder's weights run under it unchanged.
    attention: str = "full"
    adapter_dim: int = 0  # adapters' bottleneck width (0: none)
    # Where adapters go: "mlp", a bottleneck beside each MLP; "aat", AAT's placement (a sequential
    # bottleneck after attention and one beside the MLP); "conv", TI-CL's ConvPass (a 3x3
    # convolution over the token grid inside a bottleneck, beside attention and beside the MLP).
    adapter: str = "mlp"
    # Mamba's state size, causal conv width and inner expansion (dt's rank is ceil(width / 16))
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    width_mult: float = 1.0  # a mobilenet's channel multiplier (EfficientAT's mnXX: 0.XX)
    stages: tuple[int, ...] = ()  # a MAST's blocks per stage (summing to depth); `width`, `heads`: its last stage's

    def __post_init__(self):
        for name, value, allowed in (("encoder", self.encoder, ENCODERS), ("tokens", self.tokens, TOKENS), ("positions", self.positions, POSITIONS), ("pool", self.pool, POOLS),
                                     ("attention", self.attention, ATTENTIONS), ("adapter", self.adapter, ADAPTERS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if self.pool == "cls" and not self.cls_tokens:
            raise ValueError("pool='cls' needs cls_tokens > 0")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by {self.heads} heads")
        if self.encoder == "mamba" and (not self.norm_first or self.adapter_dim):
            raise ValueError("mamba blocks are pre-LN and have no MLP to put adapters beside")
        if self.encoder == "mamba" and self.attention != "full":
            raise ValueError("mamba blocks have no attention to factorise (attention 'fta' is for transformer blocks)")
        if self.encoder == "mobilenet":
            if self.attention != "full" or self.adapter_dim:
                raise ValueError("a mobilenet has no attention to factorise nor blocks to put adapters in")
            if self.width != divisible(1280 * self.width_mult):
                raise ValueError(f"a mobilenet at width_mult {self.width_mult:g} projects to {divisible(1280 * self.width_mult)}, not width {self.width}")
        object.__setattr__(self, "stages", tuple(self.stages))  # a list, from a checkpoint's JSON
        if (self.encoder == "mast") != bool(self.stages):
            raise ValueError("stages are a MAST's (encoder 'mast'), and a MAST needs them")
        if self.encoder == "mast":
            if self.attention != "full" or self.adapter_dim or self.tokens != "patch" or self.cls_tokens:
                raise ValueError("a MAST has its own patch embedding and pooling attention: no fta, adapters, other tokens or cls tokens")
            if sum(self.stages) != self.depth or min(self.stages) < 1:
                raise ValueError(f"stages {self.stages} do not sum to depth {self.depth} with a block in each")
            halvings = 2 ** (len(self.stages) - 1)
            if self.width % halvings or self.heads % halvings or (self.width // halvings) % (self.heads // halvings):
                raise ValueError(f"width {self.width} and heads {self.heads} do not halve {len(self.stages) - 1} times into whole heads")
        if self.adapter_dim < 0:
            raise ValueError(f"adapter_dim {self.adapter_dim} is not >= 0")
        if self.tokens == "conv" and (self.stride_freq or self.stride_time):
            raise ValueError("conv tokens take no patch strides (the stem sets its own)")
        if self.encoder in TOKEN_ENCODERS and self.tokens != "conv" and not self.overlapping and self.n_mels % self.patch_freq:
            raise ValueError(f"n_mels {self.n_mels} is not a multiple of the patch height {self.patch_freq}")

    @property
    def stage_widths(self) -> tuple[int, ...]:
        """A MAST's width per stage, doubling up to `width`."""
        return tuple(self.width >> (len(self.stages) - 1 - s) for s in range(len(self.stages)))

    @property
    def stage_heads(self) -> tuple[int, ...]:
        return tuple(self.heads >> (len(self.stages) - 1 - s) for s in range(len(self.stages)))

    @property
    def head_norm(self) -> bool:
        """Do heads normalise the embedding first? SSAST's heads do; EfficientAT's classifier
        reads its projection as it is."""
        return self.encoder != "mobilenet"

    @property
    def patch_freq(self) -> int:
        return self.n_mels if self.tokens == "frame" else 16

    @property
    def patch_time(self) -> int:
        return 2 if self.tokens == "frame" else 16

    @property
    def patch_dim(self) -> int:
        return self.patch_freq * self.patch_time

    @property
    def step_freq(self) -> int:
        return self.stride_freq or self.patch_freq

    @property
    def step_time(self) -> int:
        return self.stride_time or self.patch_time

    @property
    def overlapping(self) -> bool:
        return (self.step_freq, self.step_time) != (self.patch_freq, self.patch_time)

    @property
    def freq_patches(self) -> int:
        if self.tokens == "conv":
            return halved(self.n_mels, CONV_STEM_LAYERS)
        return (self.n_mels - self.patch_freq) // self.step_freq + 1

    def time_patches(self, frames: int) -> int:
        if self.tokens == "conv":
            return halved(frames, CONV_STEM_LAYERS) if frames >= self.patch_time else 0
        return max(0, (frames - self.patch_time) // self.step_time + 1)

    def num_tokens(self, frames: int) -> int:
        """Patch tokens for `frames` input frames (cls tokens not counted; a MAST's first stage)."""
        if self.encoder == "mast":
            return mast_grid(frames) * mast_grid(self.n_mels)
        return self.time_patches(frames) * self.freq_patches

    @property
    def grid(self) -> bool:
        """Do the blocks need the tokens as their whole (time, frequency) grid? FTA's rows and
        columns and a conv adapter's 3x3 neighbours do; masked pretraining's visible subset is
        not a grid."""
        return self.attention == "fta" or (self.adapter_dim > 0 and self.adapter == "conv")

    def to_dict(self) -> dict:
        return {**asdict(self), "stages": list(self.stages)}  # as JSON holds it

    @classmethod
    def from_dict(cls, d: dict) -> EncoderConfig:
        return cls(**_known(cls, d))

    @classmethod
    def named(cls, size: str, **overrides) -> EncoderConfig:
        sizes = sizes_of(overrides.get("encoder", "transformer"))
        if size not in sizes:
            raise ValueError(f"unknown size {size!r}; choose from {', '.join(sizes)}")
        return cls(**{**sizes[size], **overrides})


CONV_STEM_LAYERS = 4  # stride-2 convolutions of the "conv" stem: 16x fewer rows each way, as a patch


def halved(n: int, times: int) -> int:
    """Rows left after `times` stride-2, padding-1 3x3 convolutions: ceil(n / 2) each time."""
    for _ in range(times):
        n = strided(n, 2)
    return n


def _known(cls, d: dict) -> dict:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} options: {', '.join(sorted(unknown))}")
    return d


# The two kinds of head, and the events each makes.
TAGS, KEYWORDS = "tags", "keywords"  # multi-label sigmoid (sound events); one-of-N softmax (keyword spots)
HEAD_KINDS = (TAGS, KEYWORDS)
EVENT_KINDS = {TAGS: "tag", KEYWORDS: "keyword"}
# Keyword classes that say "no keyword here": trained and scored like the others, never spotted.
UNKNOWN, SILENCE = "_unknown_", "_silence_"
NOT_SPOTTED = (UNKNOWN, SILENCE)


@dataclass(frozen=True)
class HeadConfig:
    kind: str
    labels: tuple[str, ...]
    # A class's broader classes in this head (AudioSet ontology: "Dog" -> "Domestic animals,
    # pets" -> "Animal"), so output can fold an ancestor into the specific class firing with it.
    parents: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {', '.join(HEAD_KINDS)}, not {self.kind!r}")
        object.__setattr__(self, "labels", tuple(self.labels))
        object.__setattr__(self, "parents", {child: tuple(ps) for child, ps in self.parents.items()})
        unknown = (set(self.parents) | {p for ps in self.parents.values() for p in ps}) - set(self.labels)
        if unknown:
            raise ValueError(f"head {self.kind}: parents name classes it does not have: {', '.join(sorted(unknown)[:5])}")

    def ancestors(self) -> list[set[int]]:
        """Per class, the indices of every broader class (parents of parents, ...)."""
        index = {label: i for i, label in enumerate(self.labels)}
        out: list[set[int]] = []
        for label in self.labels:
            seen, todo = set(), list(self.parents.get(label, ()))
            while todo:
                parent = todo.pop()
                if index[parent] not in seen:
                    seen.add(index[parent])
                    todo.extend(self.parents.get(parent, ()))
            out.append(seen)
        return out

    @property
    def spotted(self) -> tuple[bool, ...]:
        """Per class: can it become an event (every tag; keywords but the "no keyword" classes)."""
        return tuple(self.kind == TAGS or label not in NOT_SPOTTED for label in self.labels)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "labels": list(self.labels), **({"parents": {c: list(ps) for c, ps in self.parents.items()}} if self.parents else {})}


# ---------------------------------------------------------------------------------------------
# Tasks: heads added to a frozen base

BASE = "base"  # the name that selects a model's own heads among its tasks (`ModelSpec.select`)
TASK_ADAPTERS = ("none", *ADAPTERS)  # "none": a linear probe on the base's embedding


@dataclass(frozen=True)
class TaskConfig:
    """A task learned on a frozen base: one head and, unless it is a linear probe on the base's
    embedding, its own adapters (EncoderConfig.adapter's kinds) in the base's last `layers`
    blocks. A run shares the base's blocks before the first adapted one with the base's heads and
    every other task. All a task owns is here and under `tasks.NAME.` in the weights, so adding
    one leaves every byte of the base and of the other tasks as it was."""

    head: HeadConfig
    adapter: str = "none"
    adapter_dim: int = 0
    layers: int = 0  # adapted blocks, counted from the last
    thresholds: dict[str, float] = field(default_factory=dict, hash=False)  # label -> calibrated `on` threshold
    provenance: dict = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if self.adapter not in TASK_ADAPTERS:
            raise ValueError(f"a task's adapter must be one of {', '.join(TASK_ADAPTERS)}, not {self.adapter!r}")
        if self.adapter == "none" and (self.adapter_dim or self.layers):
            raise ValueError("a linear task (adapter 'none') has no adapter_dim or layers")
        if self.adapter != "none" and (self.adapter_dim < 1 or self.layers < 1):
            raise ValueError(f"adapter {self.adapter!r} needs adapter_dim >= 1 and layers >= 1 (got {self.adapter_dim}, {self.layers})")

    @property
    def kind(self) -> str:
        """What the task trains, in words."""
        return "a linear probe" if self.adapter == "none" else f"{self.adapter} adapters in the last {self.layers} blocks"

    def to_dict(self) -> dict:
        return {"head": self.head.to_dict(), "adapter": self.adapter, "adapter_dim": self.adapter_dim, "layers": self.layers,
                "thresholds": self.thresholds, "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict) -> TaskConfig:
        d = dict(_known(cls, d))
        h = d.pop("head")
        return cls(HeadConfig(h["kind"], h["labels"], h.get("parents", {})), **d)


# ---------------------------------------------------------------------------------------------
# The stream and the whole spec


@dataclass(frozen=True)
class StreamConfig:
    """How the model listens: `window` seconds of audio per encoder pass, one pass every `hop`."""

    window: float = field(default=1.0, metadata={"help": "Seconds of audio the model reads per encoder pass."})
    hop: float = field(default=0.5, metadata={"help": "Seconds between passes (a whole number of fbank frames)."})

    def frames(self, fbank: FbankConfig) -> tuple[int, int]:
        """(window, hop) in frames of this fbank: the one place seconds become frames. A window
        must be whole samples and a hop whole frames; nothing is rounded."""
        samples = _whole(self.window * fbank.sample_rate, f"a window of {self.window:g} s is not a whole number of samples at {fbank.sample_rate} Hz")
        shift_ms = 1000 * fbank.frame_shift / fbank.sample_rate
        hop = _whole(self.hop * fbank.sample_rate / fbank.frame_shift, f"a hop of {self.hop:g} s is not a whole number of {shift_ms:g} ms frames")
        if hop < 1:
            raise SpecError(f"a hop of {self.hop:g} s is shorter than one {shift_ms:g} ms frame")
        return fbank.num_frames(samples), hop

    @classmethod
    def spanning(cls, frames: int, fbank: FbankConfig) -> StreamConfig:
        """The window whose samples make exactly `frames` frames (a model with a fixed input
        length), at the default hop."""
        samples = (frames - 1) * fbank.frame_shift + fbank.frame_length
        return cls(window=samples / fbank.sample_rate)


def _check_thresholds(owner: str, labels: tuple[str, ...], per_label: dict) -> None:
    unknown = set(per_label) - set(labels)
    if unknown:
        raise SpecError(f"thresholds for {owner} name labels it does not have: {', '.join(sorted(unknown))}")
    for label, t in per_label.items():  # math.inf: never (calibration tries thresholds that way)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (0 <= t <= 1 or t == math.inf):
            raise SpecError(f"thresholds for {owner}: {label!r} is {t!r}, not a probability")


def _whole(value: float, what: str) -> int:
    n = round(value)
    if abs(value - n) > 1e-6:
        raise SpecError(f"{what} ({value:g} of them)")
    return n


@dataclass(frozen=True)
class ModelSpec:
    encoder: EncoderConfig
    fbank: FbankConfig
    heads: dict[str, HeadConfig] = field(default_factory=dict)
    stream: StreamConfig = field(default_factory=StreamConfig)
    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)  # head -> label -> calibrated `on` threshold
    calibration: dict = field(default_factory=dict)  # what the thresholds were measured on (train.calibrate)
    provenance: dict = field(default_factory=dict)  # where the weights came from: stage, settings, validation, id
    tasks: dict[str, TaskConfig] = field(default_factory=dict)  # heads added to the frozen base (TaskConfig)
    # The model's own keywords are spotted only in hops where its own Speech tag reaches this:
    # calibrated with the keyword threshold on running audio (0: never gated)
    speech_gate: float = 0.0
    # ... and from the mean of their probabilities over the hops of this many seconds (causal):
    # a word lasts several hops, a false alarm often one. Calibrated with the gate (0: each hop alone)
    keyword_smoothing: float = 0.0
    # derived from `stream` and `fbank`, and from `heads`, in __post_init__
    window_frames: int = field(init=False, compare=False)
    hop_frames: int = field(init=False, compare=False)
    speech_tag: tuple[str, int] | None = field(init=False, compare=False)  # (tag head, column) of its own Speech class, if any

    def __post_init__(self):
        if self.encoder.n_mels != self.fbank.n_features:
            raise SpecError(f"the encoder reads {self.encoder.n_mels} features per frame; its fbank makes {self.fbank.n_features}")
        window_frames, hop_frames = self.stream.frames(self.fbank)
        if window_frames < self.encoder.patch_time:
            raise SpecError(f"a window of {self.stream.window:g} s makes {window_frames} frames, fewer than one token ({self.encoder.patch_time} frames)")
        for head, per_label in self.thresholds.items():
            _check_thresholds(repr(head), self.heads[head].labels if head in self.heads else (), per_label)
        for name, task in self.tasks.items():
            self._check_task(name, task)
        speech_tag = next(((name, h.labels.index("Speech")) for name, h in self.heads.items() if h.kind == TAGS and "Speech" in h.labels), None)
        if not 0 <= self.speech_gate < 1:
            raise SpecError(f"speech_gate {self.speech_gate} is not in [0, 1)")
        if self.speech_gate and speech_tag is None:
            raise SpecError(f"speech_gate {self.speech_gate}: the model has no Speech tag to gate its keywords on")
        s = self.keyword_smoothing
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not (math.isfinite(s) and s >= 0):
            raise SpecError(f"keyword_smoothing {s!r} is not a number of seconds >= 0")
        object.__setattr__(self, "window_frames", window_frames)
        object.__setattr__(self, "hop_frames", hop_frames)
        object.__setattr__(self, "speech_tag", speech_tag)

    def _check_task(self, name: str, task: TaskConfig) -> None:
        if not name or name == BASE or name in self.heads or not all(ch.isalnum() or ch in "-_" for ch in name):
            raise SpecError(f"task name {name!r}: use letters, digits, '-' and '_', other than {BASE!r} and the heads' names ({', '.join(self.heads)})")
        e = self.encoder
        if task.adapter != "none":
            if e.encoder != "transformer":
                raise SpecError(f"task {name!r}: {e.encoder} blocks have no MLP or attention to put adapters beside (a linear task works)")
            if e.adapter_dim:
                raise SpecError(f"task {name!r}: this base has adapters of its own; a task's adapters need a base without them")
            if task.layers > e.depth:
                raise SpecError(f"task {name!r}: adapts {task.layers} blocks of a {e.depth}-block encoder")
        _check_thresholds(f"task {name!r}", task.head.labels, task.thresholds)

    def with_thresholds(self, thresholds: dict[str, dict[str, float]], calibration: dict) -> ModelSpec:
        """This spec with thresholds by output name (`outputs`: a head's, or a task's under its
        name), as calibration measures them, and what they were measured on."""
        unknown = set(thresholds) - set(self.outputs)
        if unknown:
            raise SpecError(f"thresholds name outputs the model does not have: {', '.join(sorted(unknown))}")
        tasks = {name: replace(t, thresholds=thresholds.get(name, t.thresholds)) for name, t in self.tasks.items()}
        return replace(self, thresholds={n: t for n, t in thresholds.items() if n in self.heads}, calibration=calibration, tasks=tasks)

    @property
    def outputs(self) -> dict[str, HeadConfig]:
        """Every head the model can answer with: its own, then each task's under the task's name."""
        return {**self.heads, **{name: task.head for name, task in self.tasks.items()}}

    def select(self, tasks: tuple[str, ...] = ()) -> ModelSpec:
        """The spec of a run of these tasks (BASE: the model's own heads; none named: the base
        and every task): their heads as its `heads`, their thresholds as its `thresholds`, no
        tasks of its own. What a backend serves; the weights' spec stays whole."""
        names = tuple(dict.fromkeys(tasks)) or (BASE, *self.tasks)
        unknown = [n for n in names if n != BASE and n not in self.tasks]
        if unknown:
            raise SpecError(f"no task {', '.join(map(repr, unknown))}; this model has {', '.join([BASE, *self.tasks])}")
        heads, thresholds = {}, {}
        for name in names:
            if name == BASE:
                heads |= self.heads
                thresholds |= self.thresholds
            else:
                heads[name] = self.tasks[name].head
                thresholds |= {name: self.tasks[name].thresholds} if self.tasks[name].thresholds else {}
        own = BASE in names  # the speech gate and keyword smoothing are the base's, calibrated for its keyword head
        return replace(self, heads=heads, thresholds=thresholds, tasks={}, speech_gate=self.speech_gate if own else 0.0,
                       keyword_smoothing=self.keyword_smoothing if own else 0.0)

    @property
    def window_samples(self) -> int:
        """The samples a window's frames span (15,920 for 1 s at 16 kHz, 25 ms frames every 10 ms)."""
        return (self.window_frames - 1) * self.fbank.frame_shift + self.fbank.frame_length

    @property
    def window_seconds(self) -> float:
        """The audio a window's frames span (0.995 s for 1 s at 25 ms frames every 10 ms)."""
        return self.window_samples / self.fbank.sample_rate

    @property
    def hop_seconds(self) -> float:
        return self.hop_frames * self.fbank.frame_shift / self.fbank.sample_rate

    @property
    def model_id(self) -> str | None:
        return self.provenance.get("id")

    def head_of(self, kind: str) -> str:
        """The name of the model's head of this kind ("tags" or "keywords")."""
        name = next((name for name, h in self.heads.items() if h.kind == kind), None)
        if name is None:
            raise SpecError(f"the model has no {kind} head")
        return name

    def with_stream(self, window: float | None = None, hop: float | None = None) -> ModelSpec:
        """The same model listening with another window and/or hop (None keeps its own)."""
        if window is None and hop is None:
            return self
        return replace(self, stream=StreamConfig(self.stream.window if window is None else window, self.stream.hop if hop is None else hop))

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "encoder": self.encoder.to_dict(),
            "fbank": self.fbank.to_dict(),
            "heads": {name: h.to_dict() for name, h in self.heads.items()},
            "stream": asdict(self.stream),
            "thresholds": self.thresholds,
            "calibration": self.calibration,
            "provenance": self.provenance,
            **({"tasks": {name: t.to_dict() for name, t in self.tasks.items()}} if self.tasks else {}),
            **({"speech_gate": self.speech_gate} if self.speech_gate else {}),
            **({"keyword_smoothing": self.keyword_smoothing} if self.keyword_smoothing else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """The spec of a plain dict (a checkpoint header, a manifest); anything that does not
        describe a model is a SpecError that says what, never another exception."""
        if not isinstance(d, dict):
            raise SpecError(f"a spec is a JSON object, not a {type(d).__name__}")
        d = dict(d)
        version = d.pop("format", None)
        if version not in (FORMAT, FORMAT_1):
            raise SpecError(f"unsupported format {version!r} (this edgetag reads {FORMAT} and {FORMAT_1})")
        known = {f.name for f in fields(cls) if f.init}
        if set(d) - known:
            raise SpecError(f"unknown spec entries: {', '.join(sorted(set(d) - known))}")
        try:
            heads = {name: HeadConfig(h["kind"], h["labels"], h.get("parents", {})) for name, h in d.pop("heads", {}).items()}
            thresholds = d.pop("thresholds", {})
            if version == FORMAT_1:
                thresholds = {name: {label: t for label, t in thresholds.items() if label in h.labels} for name, h in heads.items()}
                thresholds = {name: t for name, t in thresholds.items() if t}
            tasks = {name: TaskConfig.from_dict(t) for name, t in d.pop("tasks", {}).items()}
            return cls(encoder=EncoderConfig.from_dict(d.pop("encoder")), fbank=FbankConfig.from_dict(d.pop("fbank")), heads=heads,
                       stream=StreamConfig(**d.pop("stream", {})), thresholds=thresholds, tasks=tasks, **d)
        except SpecError:
            raise
        except KeyError as e:
            raise SpecError(f"missing {e}") from e
        except (TypeError, AttributeError, ValueError) as e:
            raise SpecError(str(e)) from e
