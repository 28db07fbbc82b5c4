"""Augmentation on batches of log-mel fbanks (natural-log mel power), before normalisation.

Features are computed once per clip, so mixing happens in the mel power domain: the powers of
two uncorrelated signals add in expectation, which makes log(e^a + e^b) the mel fbank of the
mixed waveform up to the cross terms (zero on average). Gain is an offset of the log power.
SpecAugment masks come after normalisation, where zero is the dataset mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.options import setting


@dataclass
class AugmentConfig:
    mixup: float = setting(0.5, "Probability that a clip is mixed with another of its batch.")
    mixup_alpha: float = setting(10.0, "Mixup weights ~ Beta(alpha, alpha), as SSAST.")
    noise_prob: float = setting(0.5, "Probability of background noise (from --noise).")
    snr_db: tuple[float, float] = setting((0.0, 20.0), "Background noise at a uniform SNR in this range (dB).")
    gain_db: float = setting(6.0, "Gain uniform in +-this many dB.")
    shift: int = setting(10, "Roll clips in time by up to this many frames either way (SSAST).")
    freq_mask: int = setting(24, "SpecAugment: one band of up to this many mel bins.")
    time_mask: int = setting(24, "SpecAugment: one span of up to this many frames.")

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(mixup=0, noise_prob=0, gain_db=0, shift=0, freq_mask=0, time_mask=0)


def gain(x: torch.Tensor, db: torch.Tensor) -> torch.Tensor:
    """x [B, T, F] scaled by db [B] decibels of power."""
    return x + (db * math.log(10) / 10)[:, None, None]


def mean_power(x: torch.Tensor) -> torch.Tensor:
    """[B, T, F] log power -> [B] mean power."""
    return x.exp().mean(dim=(1, 2))


def add_noise(x: torch.Tensor, noise: torch.Tensor, snr_db: torch.Tensor) -> torch.Tensor:
    """Mix noise [B, T, F] into x at snr_db [B] (mean mel power ratio)."""
    scale = mean_power(x) / mean_power(noise) / 10 ** (snr_db / 10)
    return torch.logaddexp(x, noise + scale.log()[:, None, None])


def mixup(x: torch.Tensor, y: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each clip with x[partner] at weight lam [B] (in power); targets mix alike."""
    w = lam[:, None, None]
    mixed = torch.logaddexp(x + w.log(), x[partner] + (1 - w).log())
    return mixed, lam[:, None] * y + (1 - lam[:, None]) * y[partner]


def time_shift(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Roll each clip along time by shifts[b] frames."""
    T = x.shape[1]
    index = (torch.arange(T)[None, :] - shifts[:, None]) % T  # [B, T]
    return x.gather(1, index[:, :, None].expand_as(x))


def spec_augment(x: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one random frequency band and one random time span per clip (x normalised)."""
    B, T, F = x.shape
    keep = torch.ones_like(x, dtype=torch.bool)
    for size, length, axis in ((freq_mask, F, 2), (time_mask, T, 1)):
        if not size:
            continue
        width = torch.randint(0, size + 1, (B,), generator=generator)
        start = (torch.rand(B, generator=generator) * (length - width + 1)).long()
        pos = torch.arange(length)[None, :]
        band = (pos >= start[:, None]) & (pos < (start + width)[:, None])  # [B, length]
        keep &= ~(band[:, None, :] if axis == 2 else band[:, :, None])
    return x * keep


def augment(x: torch.Tensor, y: torch.Tensor, c: AugmentConfig, generator: torch.Generator, noise_bank: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain, background noise, mixup and time shift on log-mel x [B, T, F] with targets y [B, C]."""
    B, T, _ = x.shape

    def chosen(p: float) -> torch.Tensor:
        return torch.rand(B, generator=generator) < p

    if c.gain_db:
        x = gain(x, (torch.rand(B, generator=generator) * 2 - 1) * c.gain_db)
    if c.noise_prob and noise_bank is not None and len(noise_bank):
        picks = torch.randint(0, len(noise_bank), (B,), generator=generator)
        starts = torch.randint(0, noise_bank.shape[1] - T + 1, (B,), generator=generator)
        noise = torch.stack([noise_bank[p, s : s + T] for p, s in zip(picks.tolist(), starts.tolist())])
        snr = c.snr_db[0] + torch.rand(B, generator=generator) * (c.snr_db[1] - c.snr_db[0])
        x = torch.where(chosen(c.noise_prob)[:, None, None], add_noise(x, noise, snr), x)
    if c.mixup and B > 1:
        lam = torch.distributions.Beta(c.mixup_alpha, c.mixup_alpha).sample((B,))
        lam = torch.where(chosen(c.mixup), lam, torch.ones(B))
        x, y = mixup(x, y, torch.randperm(B, generator=generator), lam)
    if c.shift:
        x = time_shift(x, torch.randint(-c.shift, c.shift + 1, (B,), generator=generator))
    return x, y
