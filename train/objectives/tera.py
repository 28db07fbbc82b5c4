"""TERA: pretraining by reconstructing the clean input from a corrupted one.

Liu, Li, Lee, "TERA: Self-Supervised Learning of Transformer Encoder Representation for Speech",
2021 (after Mockingjay), as the MFCC-gram transformers (Gauy & Finger 2021) were pretrained.
The input frames are altered three ways: time (contiguous spans of frames zeroed, ~15% of them),
frequency (one band of channels zeroed across the clip) and magnitude (Gaussian noise over the
clip, with some probability). The encoder reads the whole altered input, so nothing is hidden
by dropping tokens and every token kind works, a convolutional stem included; a small
prediction head rebuilds each token's clean values. L1 on the altered values (TERA) or on all
of them (the MFCC-gram release).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.model import Encoder, patchify
from edgetag.spec import EncoderConfig
from train.options import bounded, setting

LOSS_ON = ("altered", "all")


@dataclass
class TeraConfig:
    time_ratio: float = setting(0.15, "Share of the frames zeroed, in contiguous spans.")
    time_span: int = setting(7, "Frames per zeroed span.")
    freq_width: int = setting(16, "One band of up to this many channels zeroed over the whole clip (0: none).")
    noise_prob: float = setting(0.1, "Probability that a clip gets Gaussian noise over all of it.")
    noise_std: float = setting(0.2, "Standard deviation of that noise (the features are normalised).")
    loss_on: str = setting("altered", "L1 on the altered values only, or on all values.")

    def __post_init__(self):
        bounded(self, ("time_ratio", 0 <= self.time_ratio < 1, "in [0, 1)"), ("time_span", self.time_span >= 1, ">= 1"),
                ("freq_width", self.freq_width >= 0, ">= 0"), ("noise_prob", 0 <= self.noise_prob <= 1, "in [0, 1]"), ("noise_std", self.noise_std >= 0, ">= 0"))
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, not {self.loss_on!r}")


def time_spans(batch: int, frames: int, ratio: float, span: int, generator=None) -> torch.Tensor:
    """[batch, frames] bool: spans of `span` frames at random starts until round(ratio x frames)
    frames are covered (the last span trimmed to hit the count exactly)."""
    target = round(ratio * frames)
    mask = torch.zeros(batch, frames, dtype=torch.bool)
    for b in range(batch):
        while int(mask[b].sum()) < target:
            start = int(torch.randint(0, max(1, frames - span + 1), (1,), generator=generator))
            new = torch.zeros(frames, dtype=torch.bool)
            new[start : start + span] = True
            new &= ~mask[b]
            extra = int(new.sum()) - (target - int(mask[b].sum()))
            if extra > 0:  # trim from the span's end
                new[new.nonzero().flatten()[-extra:]] = False
            mask[b] |= new
    return mask


def alter(features: torch.Tensor, c: TeraConfig, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The altered input and where it was altered, both [B, T, F]."""
    B, T, Fr = features.shape
    altered = torch.zeros_like(features, dtype=torch.bool)
    altered |= time_spans(B, T, c.time_ratio, c.time_span, generator)[:, :, None]
    if c.freq_width:
        width = torch.randint(0, c.freq_width + 1, (B,), generator=generator)
        start = (torch.rand(B, generator=generator) * (Fr - width + 1)).long()
        channel = torch.arange(Fr)[None]
        altered |= ((channel >= start[:, None]) & (channel < (start + width)[:, None]))[:, None, :]
    x = features.masked_fill(altered, 0.0)
    noisy = torch.rand(B, generator=generator) < c.noise_prob
    if noisy.any():
        x = x + noisy[:, None, None] * c.noise_std * torch.randn(features.shape, generator=generator)
        altered |= noisy[:, None, None]
    return x, altered


def cells(features: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """Each token's input values [B, N, patch_dim]; a conv stem's 16x16 cells run past the input's
    edges, where they hold zeros (the stem's padding)."""
    if config.tokens == "conv":
        B, T, Fr = features.shape
        features = F.pad(features, (0, config.freq_patches * config.patch_freq - Fr, 0, config.time_patches(T) * config.patch_time - T))
    return patchify(features, config)


class TERA(nn.Module):
    def __init__(self, config: EncoderConfig, tera: TeraConfig = TeraConfig()):
        super().__init__()
        self.config, self.tera = config, tera
        self.encoder = Encoder(config)  # the runtime's, unchanged, so its weights transfer as they are
        w = config.width
        # TERA's prediction network: two layers, dropped after pretraining
        self.prediction_head = nn.Sequential(nn.Linear(w, w), nn.GELU(), nn.LayerNorm(w, eps=config.norm_eps), nn.Linear(w, config.patch_dim))

    def forward_encoder(self, features: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, F] -> token outputs of the altered input [B, N, D], and where it was altered [B, T, F]."""
        x, altered = alter(features, self.tera, generator)
        return self.encoder(x), altered

    def forward_loss(self, features: torch.Tensor, prediction: torch.Tensor, altered: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """L1 between the prediction [B, N, patch_dim] and the clean tokens, on the altered values or all."""
        target = cells(features, self.config)  # [B, N, patch_dim]
        error = (prediction - target).abs()
        if self.tera.loss_on == "all":
            l1 = error.mean()
        else:
            weight = cells(altered.to(features.dtype), self.config)  # [B, N, patch_dim], 1 where altered
            l1 = (error * weight).sum() / weight.sum().clamp_min(1.0)
        return l1, {"l1": l1.detach()}

    def forward(self, features: torch.Tensor, generator=None):
        latent, altered = self.forward_encoder(features, generator)
        loss, metrics = self.forward_loss(features, self.prediction_head(latent), altered)
        return loss, metrics, altered
