"""Knowledge distillation: a fine-tuned (or imported) teacher into a small student.

    python -m train.distill --teacher runs/teacher/best.safetensors --size mini \\
        --train ../shared/data/speech_commands --out runs/student-kws

The student takes the teacher's heads, classes and fbank, and trains in train.finetune's loop
with `TeacherTargets`: per head, (1 - alpha) x the hard-label loss + alpha x the distillation
loss, BCE against the teacher's sigmoid for tags, KL divergence at temperature T (scaled by T^2)
for keywords. Training crops start on the hop grid, so the teacher runs once per window of the
training data, through the runtime's own windows -> probabilities path (any backend: a
checkpoint, an ONNX export), and its probabilities are cached (as EfficientAT does) in
OUT/teacher_probabilities.safetensors, reused while teacher, data and window stay the same.

    python -m train.distill --views 2 --tag-teacher mn04_as_mAP_432.pt --audioset ../shared/data/audioset \
        --keyword-teacher kws_ref_model.tflite --train ... --out runs/student

With --views the student learns from augmented views of its training windows instead
(`ViewTargets`, train.views): waveforms mixed, moved and scaled before anyone hears them, labelled
once by the third-party teachers (train.teachers) and any edgetag --teacher, and cached in
OUT/views.safetensors. With --cross they also label each head's views for the other heads, so
every head learns from all the audio the student hears. Every other option (data, augmentation, modes) is train.finetune's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from edgetag.features import windows
from edgetag.runtime import load_backend
from edgetag.spec import TAGS, HeadConfig, ModelSpec
from train.finetune import FinetuneConfig, HardLabels, Task, head_loss, train
from train.labels import columns
from train.options import command, setting
from train.views import ViewsConfig

CACHE_VERSION = "probabilities/1"  # what the cache holds: bumped when its content changes meaning


@dataclass
class DistillConfig:
    teacher: str = setting("", "An edgetag teacher: a checkpoint (fine-tuned, or imported with train.convert) or an export.")
    tag_teacher: str = setting("", "EfficientAT mn04 weights (train.teachers): the tag head learns the AudioSet classes from it (needs --views and --audioset).")
    keyword_teacher: str = setting("", "The MLPerf Tiny keyword model, .tflite (train.teachers; needs --views).")
    audioset: str = setting("", "Folder with AudioSet's class_labels_indices.csv and ontology.json: the tag head's vocabulary and hierarchy.")
    backgrounds: list[str] = setting([], "[HEAD=]source of sounds mixed into that head's views (keywords: audio without words); repeatable.")
    views: ViewsConfig = setting(ViewsConfig(), "Augmented views the student and its teachers hear alike (train.views).")
    tag_alpha: float = setting(0.0, "Weight of mn04 against the datasets' labels on the tag classes a dataset here names (0: the labels alone; mn04 always teaches the others).")
    temperature: float = setting(2.0, "Softmax temperature of keyword heads.")
    alpha: float = setting(0.7, "Weight of the distillation loss against the hard labels (with --views: keywords only; tags take the datasets' labels on their classes).")
    cross: float = setting(0.0, "With --views: weight of the teachers' targets for the other heads on each head's views (tags on keyword views, keywords on tag views), so every head learns from all the audio the student hears; 0: each head from its own views only.")
    sure_negatives: bool = setting(False, "On keyword views labelled as holding no keyword (_unknown_, _silence_), the keyword teachers only split the target between those classes: their probabilities for keywords there are dropped.")
    cache: str = setting("", "The teachers' cached outputs (default: OUT/teacher_probabilities.safetensors, or OUT/views.safetensors).")
    student: FinetuneConfig = setting(FinetuneConfig(out="runs/distill", size="mini", lr=1e-3), "The student and its training.")

    def check(self) -> None:
        """Refuse weights outside [0, 1] and teachers without the views they label (before any data is read)."""
        for name, value in (("--alpha", self.alpha), ("--tag-alpha", self.tag_alpha), ("--cross", self.cross)):
            if not 0 <= value <= 1:  # NaN fails too
                raise ValueError(f"{name}: {value:g} is not in [0, 1]")
        if (self.tag_teacher or self.keyword_teacher) and not self.views.views:
            raise ValueError("--tag-teacher and --keyword-teacher label augmented views: give --views N")
        if not (self.teacher or self.views.views):
            raise ValueError("give a --teacher, or --views N to learn from augmented views (with --tag-teacher, --keyword-teacher, or hard labels alone)")
        if self.student.task:
            raise ValueError("--task: distillation trains a whole student; add tasks with train.finetune --task")
        if self.tag_teacher and not self.audioset:
            raise ValueError("--tag-teacher needs --audioset, the folder of its 527 class names")


class TeacherTargets(HardLabels):
    """Hard labels and a teacher's soft targets, for every head the teacher has."""

    stage = "distill"

    def __init__(self, c: DistillConfig, device: str = "cpu"):
        self.c = c
        self.backend = load_backend(c.teacher, device=device)
        self.fbank = self.backend.spec.fbank
        self.labels = {name: list(h.labels) for name, h in self.backend.spec.heads.items()}
        self.cache = Path(c.cache or Path(c.student.out) / "teacher_probabilities.safetensors")
        self.probabilities: dict[str, list[torch.Tensor]] = {}  # head -> per clip [grid windows, classes]
        self.hop = 0  # frames between those windows (set by prepare)

    def grid(self, spec: ModelSpec) -> int:
        return spec.hop_frames  # crops start where the teacher's cached windows do

    def provenance(self) -> dict:
        return {"teacher": {"path": self.c.teacher, "temperature": self.c.temperature, "alpha": self.c.alpha}}

    def window_probabilities(self, head: str, x: np.ndarray) -> torch.Tensor:
        """The teacher's probabilities for log-mel windows x [n, frames, F], each fitted to the
        teacher's own window: cut, or followed by silence (an AST teacher with a 10 s window
        hears the window, then nothing)."""
        frames = self.backend.spec.window_frames
        if x.shape[1] != frames:
            x = np.stack([windows(w, frames, frames)[0] for w in x])
        return torch.from_numpy(self.backend(x)[head])

    def _key(self, tasks: list[Task], spec: ModelSpec) -> str:
        teacher = Path(self.c.teacher)
        digest = hashlib.sha256((teacher / "manifest.json" if teacher.is_dir() else teacher).read_bytes())
        for t in tasks:
            digest.update(json.dumps([CACHE_VERSION, t.head, len(t.train), [tuple(f.shape) for f in t.train], spec.window_frames, spec.hop_frames]).encode())
            digest.update(torch.stack([f.sum() for f in t.train]).numpy().tobytes())
        return digest.hexdigest()

    def prepare(self, tasks: list[Task], spec: ModelSpec) -> None:
        """The teacher's probabilities for every grid window of every training clip: from the
        cache when it matches, else computed (and cached)."""
        from rich.progress import track
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        self.hop = spec.hop_frames
        key = self._key(tasks, spec)
        if self.cache.is_file():
            with safe_open(str(self.cache), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    flat = load_file(str(self.cache))
                    self.probabilities = {t.head: [flat[f"{t.head}.{i}"] for i in range(len(t.train))] for t in tasks}
                    print(f"teacher probabilities from {self.cache}")
                    return
        for t in tasks:
            if t.head not in self.labels:
                raise ValueError(f"{self.c.teacher}: the teacher has no {t.head!r} head")
            self.probabilities[t.head] = [self.window_probabilities(t.head, windows(f, spec.window_frames, spec.hop_frames))
                                          for f in track(t.train, description=f"teacher {t.head}", transient=True)]
        flat = {f"{head}.{i}": x.contiguous() for head, xs in self.probabilities.items() for i, x in enumerate(xs)}
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        save_file(flat, str(self.cache), metadata={"key": key})

    def soft_targets(self, head: str, index: list[int], starts: list[int]) -> torch.Tensor:
        """[B, C] the teacher's view of these crops: its sigmoid for tags; for keywords its softmax
        at temperature T (softmax(log p / T) = softmax(logits / T): a softmax forgets a shift)."""
        p = torch.stack([self.probabilities[head][i][start // self.hop] for i, start in zip(index, starts)])
        if self.backend.spec.heads[head].kind == TAGS:
            return p
        return tempered(p, self.c.temperature)

    def targets(self, task: Task, index: list[int], starts: list[int]) -> torch.Tensor:
        """[hard labels | soft targets], so augmentation mixes both alike."""
        return torch.cat([super().targets(task, index, starts), self.soft_targets(task.head, index, starts)], dim=1)

    def loss(self, head: HeadConfig, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard, soft = y.split(logits.shape[1], dim=1)
        return distillation_loss(head, logits, hard, soft, self.c.temperature, self.c.alpha)


def tempered(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """A softmax at T of probabilities: softmax(log p / T), which is softmax(logits / T) (a softmax forgets a shift)."""
    return (p.clamp_min(np.finfo(np.float32).tiny).log() / temperature).softmax(-1)


def distillation_loss(head: HeadConfig, logits: torch.Tensor, hard: torch.Tensor, soft: torch.Tensor, temperature: float, alpha: float) -> torch.Tensor:
    """(1 - alpha) x the hard-label loss + alpha x the distillation loss: BCE against the
    teacher's sigmoid for tags, KL divergence at temperature T (scaled by T^2) for keywords."""
    if head.kind == TAGS:
        kd = F.binary_cross_entropy_with_logits(logits, soft)
    else:
        kd = F.kl_div((logits / temperature).log_softmax(-1), soft, reduction="batchmean") * temperature**2
    return (1 - alpha) * head_loss(logits, hard, head.kind) + alpha * kd


# ---------------------------------------------------------------------------------------------
# Augmented views, labelled by every teacher once


VIEWS_VERSION = "views/5"  # what the views cache holds: bumped when its content changes meaning


class ViewTargets(HardLabels):
    """The student learns from augmented views of its training windows (train.views) that the
    teachers labelled: EfficientAT mn04 for tags (the AudioSet vocabulary), the MLPerf Tiny model
    for keywords, an edgetag teacher for the heads it has; where several teach one class their
    probabilities are averaged. Tags learn from one target per class: on the classes some dataset
    here names (with their ontology ancestors) the clip's label, moved towards mn04's probability
    by tag_alpha; on the others the teachers' probability. With tag_alpha 0 mn04 teaches the
    AudioSet vocabulary beyond the datasets' classes, not different answers on them. (Its
    probabilities alone on the named classes made its AudioSet priors the student's: "Music"
    became the answer for most UrbanSound8K clips, and labelled classes mn04 was unsure of were
    out-voted by those it was sure of; a share of them says which windows of a weakly labelled
    clip actually hold its sound.) The loss is
    summed over classes and divided by the named ones, so the encoder hears the tags as loudly
    beside the keywords as a head of the named classes alone would make it (a mean over
    AudioSet's 531 made them a ninth as loud, and the tags stalled). Keywords: (1 - alpha) hard labels + alpha teachers, at
    temperature T. A head no teacher knows learns from its hard labels."""

    stage = "distill"

    def __init__(self, c: DistillConfig, device: str = "cpu"):
        from train.labels import EXTRA_TAGS, audioset_vocabulary

        self.c, self.device = c, device
        self.inhouse = load_backend(c.teacher, device=device) if c.teacher else None
        self.fbank = self.inhouse.spec.fbank if self.inhouse else None
        self.labels = {name: list(h.labels) for name, h in self.inhouse.spec.heads.items()} if self.inhouse else {}
        self.parents: dict[str, dict[str, tuple[str, ...]]] = {}
        if c.audioset:
            vocabulary, self.parents[TAGS] = audioset_vocabulary(Path(c.audioset))
            self.labels[TAGS] = vocabulary + list(EXTRA_TAGS)
        self.cache = Path(c.cache or Path(c.student.out) / "views.safetensors")
        self.soft: dict[str, torch.Tensor] = {}
        self.cross: dict[str, dict[str, torch.Tensor]] = {}  # per head, the teachers' targets of its views for the other heads
        self.taught: dict[str, bool] = {}
        self.named: dict[str, int] = {}  # per head, how many classes the datasets name

    def provenance(self) -> dict:
        return {"teachers": {"teacher": self.c.teacher, "tags": self.c.tag_teacher, "keywords": self.c.keyword_teacher},
                "alpha": self.c.alpha, "tag_alpha": self.c.tag_alpha, "cross": self.c.cross, "sure_negatives": self.c.sure_negatives, "temperature": self.c.temperature, "views": asdict(self.c.views), "backgrounds": self.c.backgrounds}

    def _key(self, task: Task, spec: ModelSpec) -> str:
        files = [p for p in (self.c.teacher, self.c.tag_teacher, self.c.keyword_teacher) if p]
        return hashlib.sha256(json.dumps([VIEWS_VERSION, task.head, task.labels, [e.path for e in task.examples], [e.labels for e in task.examples],
                                          asdict(self.c.views), self.c.backgrounds, self.c.alpha, self.c.tag_alpha, self.c.cross > 0, spec.fbank.to_dict(), spec.window_frames,
                                          [(p, Path(p).stat().st_size) for p in files]]).encode()).hexdigest()

    def teach(self, head: HeadConfig, name: str, audio: np.ndarray, feats: torch.Tensor | None) -> torch.Tensor | None:
        """The teachers' mean probabilities [n, classes] of these views, waveforms and their fbank
        (which only an edgetag teacher reads), NaN where none knows a class; or None."""
        from rich.progress import track

        from train import teachers

        sources = []  # (what, its labels, probabilities of the views in a slice)
        if head.kind == TAGS and self.c.tag_teacher:
            mn04 = teachers.AudioSetTeacher(Path(self.c.tag_teacher), Path(self.c.audioset) / "class_labels_indices.csv", self.device)
            sources.append(("mn04", mn04.labels, lambda b: mn04(audio[b])))
        if head.kind != TAGS and self.c.keyword_teacher:
            mlperf = teachers.KeywordTeacher(Path(self.c.keyword_teacher))
            sources.append(("mlperf", mlperf.labels, lambda b: mlperf(audio[b])))
        if self.inhouse is not None and name in self.inhouse.spec.heads:
            sources.append(("teacher", self.inhouse.spec.heads[name].labels, lambda b: self.inhouse(feats[b])[name]))
        total, count = torch.zeros(len(audio), len(head.labels)), torch.zeros(len(head.labels))
        for what, labels, probabilities in sources:
            mine, theirs = columns(labels, list(head.labels))
            for b in track([slice(i, i + 256) for i in range(0, len(audio), 256)], description=f"{what} on {name} views", transient=True):
                total[b, mine] += torch.as_tensor(np.asarray(probabilities(b)))[:, theirs].float()
            count[mine] += 1
        if not sources:
            return None
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))

    def render(self, task: Task, spec: ModelSpec, head: HeadConfig) -> dict[str, torch.Tensor]:
        from edgetag.features import fbank
        from train.data import Source, load_clips
        from train.views import render

        rate = spec.fbank.sample_rate
        samples = spec.window_samples
        backgrounds = [e for source in map(Source.parse, self.c.backgrounds) if source.head == task.head for e in source.read()]
        views = render(head.kind, task.examples, load_clips(task.examples, rate), [x for x in load_clips(backgrounds, rate) if x is not None],
                       self.c.views, samples, rate)
        feats = torch.from_numpy(np.stack([fbank(x, spec.fbank) for x in views.audio]))  # [n, window frames, F]
        assert feats.shape[1] == spec.window_frames, (feats.shape, spec.window_frames)
        hard = torch.zeros(len(views.labels), len(head.labels))
        index, ancestors = {label: i for i, label in enumerate(head.labels)}, head.ancestors()
        for row, labels in enumerate(views.labels):
            for label in labels:
                if label in index:
                    hard[row, [index[label], *ancestors[index[label]]]] = 1.0
        # the head's own teachers hear the words without their background where asked (ViewsConfig.teach_clean)
        heard, heard_feats = views.audio, feats
        if views.clean is not None:
            heard = views.clean
            heard_feats = torch.from_numpy(np.stack([fbank(x, spec.fbank) for x in heard])) if self.inhouse is not None else None
        taught = self.teach(head, task.head, heard, heard_feats)
        if taught is None:
            soft = hard.clone()
        else:
            soft = torch.where(taught.isnan(), hard, taught)
            if head.kind == TAGS:  # a clip's dataset speaks for the classes the datasets name, positive or not, mn04 beside it by tag_alpha
                soft = torch.where(hard.any(0), torch.lerp(hard, soft, self.c.tag_alpha), soft)
        out = {"feats": feats.half(), "hard": hard, "soft": soft, "taught": torch.tensor(taught is not None)}
        if self.c.cross:  # what the teachers say of these views for every other head
            for name, other in spec.heads.items():
                said = None if name == task.head else self.teach(other, name, views.audio, feats)
                if said is not None:
                    out[f"cross:{name}"] = said
        return out

    def prepare(self, tasks: list[Task], spec: ModelSpec) -> None:
        """Replace each head's training clips by their views and the teachers' targets: from the
        cache when it matches, else rendered and labelled (and cached)."""
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        cached, keys = {}, {}
        if self.cache.is_file():
            with safe_open(str(self.cache), "pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "{}"))
            cached = load_file(str(self.cache))
        current, rendered = {}, False
        for t in tasks:
            current[t.head] = self._key(t, spec)
            if keys.get(t.head) == current[t.head]:
                views = {k.split(".", 1)[1]: v for k, v in cached.items() if k.startswith(f"{t.head}.")}
                print(f"{t.head}: {len(views['hard'])} views from {self.cache}")
            else:
                views, rendered = self.render(t, spec, spec.heads[t.head]), True
                print(f"{t.head}: rendered {len(views['hard'])} views of {len(t.examples)} clips")
            cached.update({f"{t.head}.{k}": v.contiguous() for k, v in views.items()})
            t.train, t.train_y = list(views["feats"].float()), views["hard"]
            soft = views["soft"]
            if self.c.sure_negatives and spec.heads[t.head].kind != TAGS:
                soft = without_keywords_on_negatives(soft, views["hard"], spec.heads[t.head])
            self.soft[t.head], self.taught[t.head] = soft, bool(views["taught"])
            self.cross[t.head] = {k.split(":", 1)[1]: v for k, v in views.items() if k.startswith("cross:")}
            self.named[t.head] = max(1, int(views["hard"].any(0).sum()))
        if rendered:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v for k, v in cached.items() if k.split(".", 1)[0] in current}, str(self.cache), metadata={"keys": json.dumps(current)})

    def targets(self, task: Task, index: list[int], starts: list[int]) -> torch.Tensor:
        """[hard | soft | the other heads' teacher targets, by head name]."""
        return torch.cat([task.train_y[index], self.soft[task.head][index], *(p[index] for _, p in sorted(self.cross[task.head].items()))], dim=1)

    def cross_loss(self, spec: ModelSpec, head: str, logits: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor | float:
        """The other heads on `head`'s views, against what the teachers said of them (tags: the
        classes a teacher knows; keywords: at temperature T), weighted by --cross."""
        loss, col = 0.0, 2 * len(spec.heads[head].labels)
        for name, _ in sorted(self.cross[head].items()):
            classes = len(spec.heads[name].labels)
            p, col = y[:, col : col + classes], col + classes
            if spec.heads[name].kind == TAGS:
                known = ~p[0].isnan()  # a class no teacher has is NaN in every row
                bce = F.binary_cross_entropy_with_logits(logits[name][:, known], p[:, known], reduction="none")
                loss = loss + bce.sum(1).mean() / self.named[name]
            else:
                T = self.c.temperature
                loss = loss + F.kl_div((logits[name] / T).log_softmax(-1), tempered(p, T), reduction="batchmean") * T**2
        return self.c.cross * loss

    def loss(self, head: HeadConfig, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard, soft = y[:, : 2 * logits.shape[1]].split(logits.shape[1], dim=1)
        if head.kind == TAGS:  # soft already holds the dataset's labels
            return F.binary_cross_entropy_with_logits(logits, soft, reduction="none").sum(1).mean() / self.named[head.kind]
        if not self.taught[head.kind]:
            return head_loss(logits, hard, head.kind)
        return distillation_loss(head, logits, hard, tempered(soft, self.c.temperature), self.c.temperature, self.c.alpha)


def without_keywords_on_negatives(soft: torch.Tensor, hard: torch.Tensor, head: HeadConfig) -> torch.Tensor:
    """Keyword targets [n, classes] where the rows whose hard label is a "no keyword" class
    keep only the teachers' split between those classes (the hard label where they gave them
    nothing). The label is certain there: the clip was chosen because no keyword is said in it,
    and a teacher that never heard such speech is not (the MLPerf model, trained on Speech
    Commands alone, calls 20% of Arabic commands and 10% of wake words a keyword, and a
    student taught so spots them in running audio)."""
    spotted = torch.tensor(head.spotted)
    negative = ~(hard[:, spotted] > 0).any(1)
    kept = torch.where(spotted, 0.0, soft)
    mass = kept.sum(1, keepdim=True)
    kept = torch.where(mass > 0, kept / mass.clamp_min(1e-12), hard)
    return torch.where(negative[:, None], kept, soft)


def distill(c: DistillConfig, device: str | None = None) -> dict[str, dict]:
    """Distil teachers into a small student; the best epoch goes to OUT/best.safetensors. With
    --views the student trains on augmented views the teachers labelled (ViewTargets), else on
    its clips with an edgetag teacher's cached outputs (TeacherTargets)."""
    c.check()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return train(c.student, ViewTargets(c, device) if c.views.views else TeacherTargets(c, device), device)


main = command(DistillConfig, distill)

if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
