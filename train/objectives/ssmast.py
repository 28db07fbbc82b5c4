"""SS-MAST's objective: contrastive learning of clip embeddings against a momentum teacher.

Ghosh, Seth, Umesh, Manocha, "MAST: Multiscale Audio Spectrogram Transformers", ICASSP 2023
(reference code Sreyan88/LAPE, MoCo-v2 style). Two views of each clip (mixup with another clip
of the batch, then a random resized crop of the log-mel); the student encodes each view with a
random share of its patch tokens dropped, the teacher (an exponential moving average of the
student, never trained by gradients) encodes both views whole; each side's mean-pooled tokens go
through its own linear projection to 256-d and are L2-normalised. InfoNCE: a student view must
pick the teacher's embedding of the other view out of a FIFO queue of past teacher embeddings,
at temperature 0.07, both ways round (the symmetric loss). The teacher's keys then join the queue.

The objective works with the transformer, the Mamba and MAST. The first two take the subset of
tokens patch-drop leaves; FTA and conv adapters need the whole token grid, which it breaks. So does
a MAST, whose pooling convolves the grid in every block: there a dropped token stays in place,
zeroed (`patch_blank`), which is what the convolutions read beyond the grid's edge (their
padding), so it brings nothing but its place; the shortcut's max-pooling and attention still
see it as a token, and the deep stages' coarse tokens mix it with kept ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.model import new_encoder
from edgetag.spec import EncoderConfig
from train.options import bounded, setting


@dataclass
class SSMASTConfig:
    patch_drop: float = setting(0.1, "Share of the patch tokens the student does not see (one random subset per batch).")
    queue_size: int = setting(4096, "Past teacher embeddings kept as negatives (the reference: 65,536 on AudioSet; a few epochs of the data here).")
    temperature: float = setting(0.07, "Softmax temperature of the contrastive loss.")
    momentum: float = setting(0.99, "The teacher's EMA momentum at the first step, ramped to 1 by a cosine over the run.")
    projection_dim: int = setting(256, "Width of the L2-normalised embeddings compared.")
    mixup: float = setting(0.4, "Largest weight of the other clip mixed into a view (uniform in [0, mixup]).")
    crop_scale: float = setting(0.6, "Smallest share of the time and of the frequency axis a view's random resized crop keeps.")

    def __post_init__(self):
        bounded(self, ("patch_drop", 0 <= self.patch_drop < 1, "in [0, 1)"), ("queue_size", self.queue_size >= 1, ">= 1"),
                ("temperature", self.temperature > 0, "> 0"), ("momentum", 0 <= self.momentum <= 1, "in [0, 1]"),
                ("projection_dim", self.projection_dim >= 1, ">= 1"), ("mixup", 0 <= self.mixup < 1, "in [0, 1)"), ("crop_scale", 0 < self.crop_scale <= 1, "in (0, 1]"))


def kept_patches(n: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The patch-drop subset: n - round(ratio * n) random token indices of n, in order (a scan
    reads them in order), one subset for the whole batch (as the reference drops them)."""
    return torch.randperm(n, generator=generator)[: n - round(ratio * n)].sort().values


def patch_drop(x: torch.Tensor, ratio: float, cls: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, cls + N, D] -> [B, cls + keep, D]: the cls tokens and the `kept_patches` of the patch tokens."""
    ids = kept_patches(x.shape[1] - cls, ratio, generator).to(x.device) + cls
    return torch.cat([x[:, :cls], x[:, ids]], dim=1)


def patch_blank(x: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, N, D] -> [B, N, D]: the tokens outside the `kept_patches` zeroed in place."""
    keep = torch.zeros(x.shape[1], 1, dtype=x.dtype, device=x.device).index_fill_(0, kept_patches(x.shape[1], ratio, generator).to(x.device), 1)
    return x * keep


def view(features: torch.Tensor, mixup: float, crop_scale: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """An augmented view of each clip [B, T, F]: mixed with another clip of the batch in the
    log-mel domain at a weight in [0, mixup], then a random crop keeping a share in
    [crop_scale, 1] of each axis, resized back to [T, F] (bilinear)."""
    B = features.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator).to(features)  # noqa: E731
    partner = torch.randperm(B, generator=generator).to(features.device)
    lam = mixup * rand(B)[:, None, None]
    x = (1 - lam) * features + lam * features[partner]
    scale = crop_scale + (1 - crop_scale) * rand(B, 2)  # [B, (frequency, time)]
    centre = (1 - scale) * (2 * rand(B, 2) - 1)  # a crop inside the plane
    theta = torch.zeros(B, 2, 3).to(features)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = scale[:, 0], scale[:, 1], centre
    grid = F.affine_grid(theta, [B, 1, *x.shape[1:]], align_corners=False)  # x: frequency (width), y: time (height)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def symmetric_info_nce(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, queue: torch.Tensor, temperature: float):
    """Each student embedding q [B, E] against the teacher's embedding of the other view (its
    positive) and the queue [K, E] (negatives), both ways round, averaged -> loss, accuracy."""
    def one_way(q, k):
        logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ queue.T], dim=1) / temperature  # [B, 1 + K]: the positive first
        labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), (logits.argmax(-1) == 0).float().mean()

    (a, acc_a), (b, acc_b) = one_way(q1, k2), one_way(q2, k1)
    return (a + b) / 2, (acc_a + acc_b) / 2


class SSMAST(nn.Module):
    def __init__(self, config: EncoderConfig, c: SSMASTConfig = SSMASTConfig(), steps: int = 1):
        super().__init__()
        if config.grid:
            raise ValueError("SS-MAST drops patch tokens, so its encoder sees no whole grid, which FTA and conv adapters need: "
                             "pretrain with full attention (FTA has no weights of its own: fine-tune the encoder with attention 'fta')")
        self.config, self.c, self.steps = config, c, steps
        self.encoder = new_encoder(config)
        self.projection = nn.Linear(config.width, c.projection_dim)
        # the teacher: a copy that only ever moves towards the student (update_teacher)
        self.teacher_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.teacher_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(c.queue_size, c.projection_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # saved with the model, so --resume keeps the EMA schedule

    def momentum(self) -> float:
        """BYOL's cosine ramp from c.momentum at the first step to 1 at the last."""
        progress = min(1.0, self.step.item() / max(1, self.steps))
        return 1 - (1 - self.c.momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher = m teacher + (1 - m) student, parameter by parameter; buffers (a conv stem's
        batch-norm statistics) copied."""
        m = self.momentum()
        for student, teacher in ((self.encoder, self.teacher_encoder), (self.projection, self.teacher_projection)):
            for p, t in zip(student.parameters(), teacher.parameters()):
                t.mul_(m).add_(p.detach(), alpha=1 - m)
            for b, t in zip(student.buffers(), teacher.buffers()):
                t.copy_(b)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """The newest keys [n, E] replace the oldest entries of the queue (a FIFO ring; of more
        keys than it holds, the last ones)."""
        keys = keys[-len(self.queue) :]
        at = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[at] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % len(self.queue))

    def embed(self, encoder: nn.Module, projection: nn.Linear, features: torch.Tensor, drop: float) -> torch.Tensor:
        """Mean-pooled tokens (some dropped) -> projection -> unit length: [B, T, F] -> [B, E]."""
        cls = self.config.cls_tokens
        if self.config.encoder == "mast":
            x, grid = encoder.embed(features)
            x = encoder.forward_blocks(patch_blank(x, drop) if drop else x, grid)
        else:
            x = encoder.embed(features)
            x = encoder.forward_blocks(patch_drop(x, drop, cls) if drop else x)
        return F.normalize(projection(x[:, cls:].mean(dim=1)), dim=-1)

    def forward(self, features: torch.Tensor):
        """-> (loss, metrics, None): the loop's contract (no token mask to report)."""
        if self.training:  # MoCo moves its key encoder at the start of each step, after the last optimizer step
            self.update_teacher()
            self.step += 1
        v1, v2 = view(features, self.c.mixup, self.c.crop_scale), view(features, self.c.mixup, self.c.crop_scale)
        q1 = self.embed(self.encoder, self.projection, v1, self.c.patch_drop)
        q2 = self.embed(self.encoder, self.projection, v2, self.c.patch_drop)
        with torch.no_grad():
            k1 = self.embed(self.teacher_encoder, self.teacher_projection, v1, 0.0)
            k2 = self.embed(self.teacher_encoder, self.teacher_projection, v2, 0.0)
        # a copy: backward needs the negatives as they were, and enqueue overwrites the queue in place
        loss, accuracy = symmetric_info_nce(q1, q2, k1, k2, self.queue.clone(), self.c.temperature)
        if self.training:
            self.enqueue(torch.cat([k1, k2]))
        return loss, {"nce": loss.detach(), "nce_acc": accuracy.detach()}, None
