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
Every other option (data, augmentation, modes) is train.finetune's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import typer

from edgetag.features import windows
from edgetag.model import TAGS, HeadConfig
from edgetag.runtime import load_backend
from edgetag.spec import ModelSpec
from train.finetune import FinetuneConfig, HardLabels, Task, train
from train.options import command, setting

CACHE_VERSION = "probabilities/1"  # what the cache holds: bumped when its content changes meaning


@dataclass
class DistillConfig:
    teacher: str = setting("", "The teacher: an edgetag checkpoint (fine-tuned, or imported with train.convert) or export.", required=True)
    temperature: float = setting(2.0, "Softmax temperature of keyword heads.")
    alpha: float = setting(0.7, "Weight of the distillation loss against the hard labels.")
    cache: str = setting("", "The teacher's cached probabilities (default: OUT/teacher_probabilities.safetensors).")
    student: FinetuneConfig = setting(FinetuneConfig(out="runs/distill", size="mini", lr=1e-3), "The student and its training.")


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

    def window_probabilities(self, head: str, x: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities for log-mel windows x [n, frames, F], each fitted to the
        teacher's own window: cut, or followed by silence (an AST teacher with a 10 s window
        hears the window, then nothing)."""
        frames = self.backend.spec.window_frames
        if x.shape[1] != frames:
            x = torch.stack([windows(w, frames, frames)[0] for w in x])
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
        return (p.clamp_min(np.finfo(np.float32).tiny).log() / self.c.temperature).softmax(-1)

    def targets(self, task: Task, index: list[int], starts: list[int]) -> torch.Tensor:
        """[hard labels | soft targets], so augmentation mixes both alike."""
        return torch.cat([super().targets(task, index, starts), self.soft_targets(task.head, index, starts)], dim=1)

    def loss(self, head: HeadConfig, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        hard, soft = y.split(logits.shape[1], dim=1)
        if head.kind == TAGS:
            kd = F.binary_cross_entropy_with_logits(logits, soft)
        else:
            T = self.c.temperature
            kd = F.kl_div((logits / T).log_softmax(-1), soft, reduction="batchmean") * T**2
        return (1 - self.c.alpha) * super().loss(head, logits, hard) + self.c.alpha * kd


def distill(c: DistillConfig, device: str | None = None) -> dict[str, dict]:
    """Distil a teacher into a small student (the teacher's heads, classes and fbank); the best
    epoch goes to OUT/best.safetensors."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return train(c.student, TeacherTargets(c, device), device)


main = command(DistillConfig, distill)

if __name__ == "__main__":
    typer.run(main)
