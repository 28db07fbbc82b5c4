"""MAE-AST: masked-autoencoder pretraining of an Audio Spectrogram Transformer.

Baade, Peng, Harwath, "MAE-AST: Masked Autoencoding Audio Spectrogram Transformer",
Interspeech 2022. The deep encoder sees only the visible ~25% of the tokens; a shallow decoder
gets the encoder outputs back in place, a learned mask token everywhere else and the positions
added again, and predicts the masked patches. Losses on masked tokens only: reconstruction MSE
(weight 10) plus an InfoNCE among the masked tokens of each clip (weight 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.model import Block, Encoder, patchify, sincos_positions
from edgetag.spec import EncoderConfig

MASKINGS = ("random", "chunk")


# ---------------------------------------------------------------------------------------------
# Masking


def chunk_noise(batch: int, time_patches: int, freq_patches: int, num_masked: int, generator=None) -> torch.Tensor:
    """Noise whose lowest `N - num_masked` entries per clip leave masked c x c chunks.

    SSAST-style chunks (c drawn from {3, 4, 5} per clip, c time steps by up to c frequency bands)
    are added at random starts until `num_masked` tokens are covered; the last chunk is trimmed
    to hit the count exactly. Masked tokens get noise in [1, 2), visible ones in [0, 1), so the
    same argsort machinery as random masking applies. [batch, time_patches * freq_patches]
    """
    n = time_patches * freq_patches
    noise = torch.rand(batch, n, generator=generator)
    for b in range(batch):
        c = int(torch.randint(3, 6, (1,), generator=generator))
        grid = torch.zeros(time_patches, freq_patches, dtype=torch.bool)  # [t, f]
        while int(grid.sum()) < num_masked:
            t0 = int(torch.randint(0, max(1, time_patches - c + 1), (1,), generator=generator))
            f0 = int(torch.randint(0, max(1, freq_patches - c + 1), (1,), generator=generator))
            chunk = torch.zeros_like(grid)
            chunk[t0 : t0 + c, f0 : f0 + c] = True
            new = chunk & ~grid
            excess = int(grid.sum()) + int(new.sum()) - num_masked
            if excess > 0:  # keep the first cells of the chunk in time-major order
                keep = new.flatten().nonzero()[:-excess, 0]
                new = torch.zeros(n, dtype=torch.bool)
                new[keep] = True
                new = new.view(time_patches, freq_patches)
            grid |= new
        noise[b] += grid.flatten().float()
    return noise


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep a random subset of tokens per clip, as MAE does: sort noise, keep the lowest.

    The visible tokens keep their order in the sequence: attention does not care, but a Mamba
    encoder scans them in that order (MAE shuffles them).

    x [B, N, D] -> visible [B, N_keep, D], mask [B, N] (1 = masked), ids_restore [B, N]
    """
    B, N, D = x.shape
    keep = max(1, int(N * (1 - mask_ratio)))
    if noise is None:
        noise = torch.rand(B, N, device=x.device)
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)  # ascending: kept tokens first
    ids_keep = ids_shuffle[:, :keep].sort(dim=1).values
    ids_shuffle = torch.cat([ids_keep, ids_shuffle[:, keep:]], dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    visible = torch.gather(x, 1, ids_keep[:, :, None].expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to token order
    return visible, mask, ids_restore


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    return num_tokens - max(1, int(num_tokens * (1 - mask_ratio)))


# ---------------------------------------------------------------------------------------------
# Losses shared with the SSAST baseline


def info_nce(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE among the masked tokens of each clip: every prediction should pick its own
    target patch out of the clip's masked patches. pred, target [B, M, P] -> loss, accuracy."""
    scores = pred @ target.transpose(1, 2)  # [B, M, M]
    labels = torch.arange(scores.shape[1], device=scores.device).expand(scores.shape[0], -1)
    loss = F.cross_entropy(scores.flatten(0, 1), labels.flatten())  # softmax over targets
    accuracy = (scores.argmax(dim=-1) == labels).float().mean()
    return loss, accuracy


def masked_tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Tokens where mask == 1, every clip having the same count: [B, N, D] -> [B, M, D]."""
    B, N, D = x.shape
    return x[mask.bool()].view(B, -1, D)


# ---------------------------------------------------------------------------------------------
# The model


class MAEAST(nn.Module):
    def __init__(
        self,
        config: EncoderConfig,
        decoder_depth: int = 2,
        masking: str = "random",
        mask_ratio: float = 0.75,
        reconstruction_weight: float = 10.0,
        contrastive_weight: float = 1.0,
    ):
        super().__init__()
        if masking not in MASKINGS:
            raise ValueError(f"masking must be one of {', '.join(MASKINGS)}, not {masking!r}")
        if config.grid:
            raise ValueError("MAE-AST's encoder sees a random quarter of the tokens, not their grid, which FTA and conv adapters need: "
                             "pretrain with full attention (FTA has no weights of its own: fine-tune the encoder with attention 'fta')")
        self.config, self.masking, self.mask_ratio = config, masking, mask_ratio
        self.reconstruction_weight, self.contrastive_weight = reconstruction_weight, contrastive_weight

        # --- encoder: the runtime's, unchanged, so its weights transfer as they are
        self.encoder = Encoder(config)

        # --- decoder: as wide as the encoder, shallow (MAE-AST found 2 layers nearly as good as 12)
        w = config.width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, w))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(Block(w, config.heads, config.mlp_ratio, True, config.norm_eps) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(w, eps=config.norm_eps)
        self.reconstruction_head = nn.Linear(w, config.patch_dim)
        self.contrastive_head = nn.Linear(w, config.patch_dim)

    def forward_encoder(self, features: torch.Tensor, noise: torch.Tensor | None = None):
        """[B, T, F] -> latent of the visible tokens [B, N_keep, D], mask [B, N], ids_restore [B, N]."""
        x = self.encoder.embed(features)
        if noise is None and self.masking == "chunk":
            t = features.shape[1] // self.config.patch_time
            noise = chunk_noise(x.shape[0], t, self.config.freq_patches, num_masked(x.shape[1], self.mask_ratio))
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        return self.encoder.forward_blocks(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor):
        """Visible latents back in place, mask tokens elsewhere, positions added again.
        -> reconstruction and contrastive predictions, each [B, N, patch_dim]."""
        B, N = ids_restore.shape
        D = latent.shape[-1]
        x = torch.cat([latent, self.mask_token.expand(B, N - latent.shape[1], -1)], dim=1)  # [B, N, D] shuffled
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, D))  # [B, N, D] token order
        x = x + sincos_positions(N, D).to(x)[None]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.reconstruction_head(x), self.contrastive_head(x)

    def forward_loss(self, features: torch.Tensor, reconstruction, contrastive, mask):
        """Weighted MSE + InfoNCE on the masked tokens only; returns (loss, metrics)."""
        target = masked_tokens(patchify(features, self.config), mask)  # [B, M, patch_dim]
        metrics = {}
        loss = features.new_zeros(())
        if self.reconstruction_weight:
            mse = F.mse_loss(masked_tokens(reconstruction, mask), target)
            loss = loss + self.reconstruction_weight * mse
            metrics["mse"] = mse.detach()
        if self.contrastive_weight:
            nce, accuracy = info_nce(masked_tokens(contrastive, mask), target)
            loss = loss + self.contrastive_weight * nce
            metrics["nce"], metrics["nce_acc"] = nce.detach(), accuracy.detach()
        return loss, metrics

    def forward(self, features: torch.Tensor, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(features, noise)
        reconstruction, contrastive = self.forward_decoder(latent, ids_restore)
        loss, metrics = self.forward_loss(features, reconstruction, contrastive, mask)
        return loss, metrics, mask
