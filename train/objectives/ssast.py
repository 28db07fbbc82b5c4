"""SSAST, the baseline MAE-AST is measured against, in the same code base.

Gong et al., "SSAST: Self-Supervised Audio Spectrogram Transformer", AAAI 2022. Masked tokens
stay in the encoder with a learned mask embedding in place of their patch (BEiT-style), so every
layer runs on all N tokens; masks are clusters of c x c patches; the joint objective makes two
encoder passes per step, each with its own mask: one for the discriminative (InfoNCE) loss and
one for the generative (MSE) loss, weighted 1 and 10. Two-layer MLP heads, as in SSAST.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.model import Encoder, patchify
from edgetag.spec import EncoderConfig
from train.objectives.mae import chunk_noise, info_nce, masked_tokens, num_masked


class SSAST(nn.Module):
    def __init__(self, config: EncoderConfig, mask_ratio: float = 0.75, generative_weight: float = 10.0):
        super().__init__()
        self.config, self.mask_ratio, self.generative_weight = config, mask_ratio, generative_weight
        self.encoder = Encoder(config)
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, config.width))
        nn.init.xavier_normal_(self.mask_embed)
        w, p = config.width, config.patch_dim
        self.cpredlayer = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, p))
        self.gpredlayer = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, p))

    def cluster_mask(self, batch: int, frames: int) -> torch.Tensor:
        """[B, N] with exactly num_masked ones per clip, in c x c clusters."""
        t, f = frames // self.config.patch_time, self.config.freq_patches
        n = t * f
        noise = chunk_noise(batch, t, f, num_masked(n, self.mask_ratio))
        return (noise >= 1).float()

    def forward_pass(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One full-length encoder pass with masked patches replaced: -> [B, N, D]."""
        c = self.config
        x = self.encoder.patch_embed(patchify(features, c))  # [B, N, D]
        m = mask[:, :, None].to(x)
        x = x * (1 - m) + self.mask_embed * m
        x = x + self.encoder.positions(x.shape[1])
        return self.encoder.forward_blocks(x)

    def forward(self, features: torch.Tensor):
        B, T, _ = features.shape
        target = patchify(features, self.config)
        mask_d = self.cluster_mask(B, T).to(features.device)
        hidden = self.forward_pass(features, mask_d)
        nce, accuracy = info_nce(masked_tokens(self.cpredlayer(hidden), mask_d), masked_tokens(target, mask_d))
        mask_g = self.cluster_mask(B, T).to(features.device)
        hidden = self.forward_pass(features, mask_g)
        mse = F.mse_loss(masked_tokens(self.gpredlayer(hidden), mask_g), masked_tokens(target, mask_g))
        loss = nce + self.generative_weight * mse
        return loss, {"mse": mse.detach(), "nce": nce.detach(), "nce_acc": accuracy.detach()}, mask_g
