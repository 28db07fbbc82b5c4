"""Knowledge distillation: a fine-tuned (or imported) teacher into a small student.

    python -m train.distill --teacher runs/teacher/best.safetensors --size mini \\
        --train ../shared/data/speech_commands --out runs/student-kws

The student takes the teacher's heads, classes and fbank. Its loss per head is
(1 - alpha) * hard-label loss + alpha * distillation loss: BCE against the teacher's sigmoid for
tags, KL divergence at temperature T (scaled by T^2) for keywords. Training crops start on the
hop grid, so the teacher runs once per window of the training data and its logits are cached
(as EfficientAT does) in --out/teacher_logits.safetensors, reused while teacher, data and window
stay the same. Everything else (data sources, augmentation, modes) is train.finetune's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
import typer

from edgetag import checkpoint
from edgetag.features import normalize, window_frames, windows
from edgetag.runtime import stream_settings
from train.finetune import Task, config_from_cli, finetune, head_loss


class Teacher:
    """A loaded edgetag model that hands out cached soft targets per training window."""

    def __init__(self, path, temperature: float = 2.0, alpha: float = 0.7, cache: Path | None = None, device: str = "cpu", batch_size: int = 256):
        self.path, self.temperature, self.alpha, self.cache, self.device, self.batch_size = str(path), temperature, alpha, cache, device, batch_size
        self.model = checkpoint.load_model(path, device)
        self.fbank = self.model.fbank
        self.kinds = {name: h.kind for name, h in self.model.head_configs.items()}
        self.labels = {name: list(h.labels) for name, h in self.model.head_configs.items()}
        self.frames = window_frames(stream_settings(self.model.config)[0], self.fbank)
        self.logits: dict[str, list[torch.Tensor]] = {}

    def settings(self) -> dict:
        """What the student's checkpoint records about its teacher."""
        return {"path": self.path, "temperature": self.temperature, "alpha": self.alpha}

    @torch.no_grad()
    def window_logits(self, head: str, x: torch.Tensor) -> torch.Tensor:
        """Logits of log-mel windows x [n, frames, F]. A window shorter than the teacher's is
        followed by silence (an AST teacher with a 10 s window hears the window, then nothing)."""
        if x.shape[1] != self.frames:
            x = torch.stack([windows(w, self.frames, self.frames)[0] for w in x])
        return torch.cat([self.model(normalize(x[i : i + self.batch_size], self.fbank).to(self.device))[head].float().cpu() for i in range(0, len(x), self.batch_size)])

    def _key(self, tasks: list[Task], frames: int, hop: int) -> str:
        digest = hashlib.sha256(Path(self.path).read_bytes())
        for t in tasks:
            digest.update(json.dumps([t.head, len(t.train), [tuple(f.shape) for f in t.train], frames, hop]).encode())
            digest.update(torch.stack([f.sum() for f in t.train]).numpy().tobytes())
        return digest.hexdigest()

    def prepare(self, tasks: list[Task], frames: int, hop: int) -> None:
        """Teacher logits for every grid window of every training clip: from the cache when it
        matches, else computed (and cached)."""
        from rich.progress import track
        from safetensors.torch import load_file, save_file

        key = self._key(tasks, frames, hop)
        if self.cache and self.cache.is_file():
            from safetensors import safe_open

            with safe_open(str(self.cache), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    flat = load_file(str(self.cache))
                    self.logits = {t.head: [flat[f"{t.head}.{i}"] for i in range(len(t.train))] for t in tasks}
                    print(f"teacher logits from {self.cache}")
                    return
        for t in tasks:
            if t.head not in self.kinds:
                raise ValueError(f"{self.path}: the teacher has no {t.head!r} head")
            self.logits[t.head] = [self.window_logits(t.head, windows(f, frames, hop)) for f in track(t.train, description=f"teacher {t.head}", transient=True)]
        if self.cache:
            flat = {f"{head}.{i}": x.contiguous() for head, xs in self.logits.items() for i, x in enumerate(xs)}
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            save_file(flat, str(self.cache), metadata={"key": key})

    def soft_targets(self, head: str, index: list[int], starts: list[int], hop: int) -> torch.Tensor:
        """[B, C] the teacher's probabilities (at temperature T for keywords) for these crops."""
        logits = torch.stack([self.logits[head][i][start // hop] for i, start in zip(index, starts)])
        return logits.sigmoid() if self.kinds[head] == "tags" else (logits / self.temperature).softmax(-1)

    def loss(self, head: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y is [hard labels | soft targets], mixed by augmentation alike."""
        hard, soft = y.split(logits.shape[1], dim=1)
        if self.kinds[head] == "tags":
            kd = F.binary_cross_entropy_with_logits(logits, soft)
        else:
            kd = F.kl_div((logits / self.temperature).log_softmax(-1), soft, reduction="batchmean") * self.temperature**2
        return (1 - self.alpha) * head_loss(logits, hard, self.kinds[head]) + self.alpha * kd


def main(
    teacher: str = typer.Option(..., help="The teacher: an edgetag checkpoint (fine-tuned, or imported with train.convert)."),
    train: list[str] = typer.Option(..., help="Training source [HEAD=][READER:]PATH[,key=value]; repeatable."),
    val: list[str] = typer.Option([], help="Validation source; default: a split of the training data."),
    out: str = typer.Option("runs/distill"),
    size: str = typer.Option("mini", help="Student size."),
    tokens: str = typer.Option("patch"),
    init: str = typer.Option("", help="Start the student from this checkpoint (same fbank as the teacher)."),
    temperature: float = typer.Option(2.0, help="Softmax temperature for keyword heads."),
    alpha: float = typer.Option(0.7, help="Weight of the distillation loss against the hard labels."),
    cache: str = typer.Option("", help="Teacher-logit cache (default: OUT/teacher_logits.safetensors)."),
    window: float = typer.Option(1.0),
    hop: float = typer.Option(0.5, help="Seconds between windows: the crop grid the teacher is cached on."),
    loudness: float = typer.Option(1.0, help="Bias training crops towards loud windows (0: uniform)."),
    val_percent: float = typer.Option(10.0),
    noise: list[str] = typer.Option([]),
    epochs: int = typer.Option(30),
    batch_size: int = typer.Option(64),
    lr: float = typer.Option(1e-3),
    weight_decay: float = typer.Option(0.05),
    mixup: float = typer.Option(0.5),
    freq_mask: int = typer.Option(24),
    time_mask: int = typer.Option(24),
    no_augment: bool = typer.Option(False, "--no-augment"),
    seed: int = typer.Option(0),
) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cache_path = Path(cache) if cache else Path(out) / "teacher_logits.safetensors"
    t = Teacher(teacher, temperature, alpha, cache_path, device)
    c = config_from_cli(train=train, val=val, out=out, size=size, tokens=tokens, init=init, window=window, hop=hop, loudness=loudness, val_percent=val_percent,
                        noise=noise, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, mixup=mixup,
                        freq_mask=freq_mask, time_mask=time_mask, no_augment=no_augment, seed=seed)
    finetune(c, device, teacher=t)


if __name__ == "__main__":
    typer.run(main)
