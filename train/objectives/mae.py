"""MAE-AST: masked-autoencoder pretraining of an Audio Spectrogram Transformer.

Baade, Peng, Harwath, "MAE-AST: Masked Autoencoding Audio Spectrogram Transformer",
Interspeech 2022. The deep encoder sees only the visible ~25% of the tokens; a shallow decoder
gets the encoder outputs back in place, a learned mask token everywhere else and the positions
added again, and predicts the masked patches. Losses on masked tokens only: reconstruction MSE
(weight 10) plus an InfoNCE among the masked tokens of each clip (weight 1).

On a multiscale encoder (MAST, `MultiScaleMAE`) the masked tokens cannot leave: every block's
pooling convolves the whole token grid. They stay in place as a learned mask token in the first
stage (SimMIM; ConvMAE's convolutional stages; SSAST does the same in a flat transformer), so the
encoder pays for every token, and the decoder starts from the last stage's coarse grid, each
first-stage token reading the last-stage token whose cell holds it. Dropping the masked tokens
instead (Hiera's masked units aligned to the coarsest grid) needs pooling that never crosses a
unit, which is not the MAST that fine-tuning and the runtime run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetag import mast
from edgetag.model import Block, new_encoder, patchify, sincos_positions
from edgetag.spec import MAST_PATCH, EncoderConfig

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
    return visible, mask_of(noise.to(x.device), mask_ratio), ids_restore


def num_masked(num_tokens: int, mask_ratio: float) -> int:
    return num_tokens - max(1, int(num_tokens * (1 - mask_ratio)))


def mask_of(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """[B, N] (1 = masked): the num_masked tokens of highest noise in each clip, in token order
    (`random_masking`'s mask; a MAST's mask tokens, which are not gathered out)."""
    rank = noise.argsort(dim=1).argsort(dim=1)  # each token's place in ascending noise
    return (rank >= noise.shape[1] - num_masked(noise.shape[1], mask_ratio)).float()


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
        self.encoder = new_encoder(config)

        # --- decoder: as wide as the encoder, shallow (MAE-AST found 2 layers nearly as good as 12)
        w, patch_dim = config.width, self.patch_dim()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.mask_width()))
        nn.init.normal_(self.mask_token, std=0.02)
        self.decoder_blocks = nn.ModuleList(Block(w, config.heads, config.mlp_ratio, True, config.norm_eps) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(w, eps=config.norm_eps)
        self.reconstruction_head = nn.Linear(w, patch_dim)
        self.contrastive_head = nn.Linear(w, patch_dim)

    def patch_dim(self) -> int:
        """Values in a token's target."""
        return self.config.patch_dim

    def mask_width(self) -> int:
        """Width where the mask token goes in: the decoder's input."""
        return self.config.width

    def patchify(self, features: torch.Tensor) -> torch.Tensor:
        """The targets, one per token: [B, T, F] -> [B, N, patch_dim]."""
        return patchify(features, self.config)

    def noise(self, batch: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """Chunked masks' noise on the (time, frequency) token grid; None: random masks."""
        n = grid[0] * grid[1]
        return chunk_noise(batch, *grid, num_masked(n, self.mask_ratio)) if self.masking == "chunk" else None

    def forward_encoder(self, features: torch.Tensor, noise: torch.Tensor | None = None):
        """[B, T, F] -> latent of the visible tokens [B, N_keep, D], mask [B, N], ids_restore [B, N]."""
        x = self.encoder.embed(features)
        if noise is None:
            noise = self.noise(x.shape[0], (features.shape[1] // self.config.patch_time, self.config.freq_patches))
        x, mask, ids_restore = random_masking(x, self.mask_ratio, noise)
        return self.encoder.forward_blocks(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor):
        """Visible latents back in place, mask tokens elsewhere, positions added again.
        -> reconstruction and contrastive predictions, each [B, N, patch_dim]."""
        B, N = ids_restore.shape
        D = latent.shape[-1]
        x = torch.cat([latent, self.mask_token.expand(B, N - latent.shape[1], -1)], dim=1)  # [B, N, D] shuffled
        x = torch.gather(x, 1, ids_restore[:, :, None].expand(-1, -1, D))  # [B, N, D] token order
        return self.decode(x)

    def decode(self, x: torch.Tensor):
        """Decoder input in token order [B, N, D] -> reconstruction and contrastive predictions."""
        x = x + sincos_positions(x.shape[1], x.shape[2]).to(x)[None]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.reconstruction_head(x), self.contrastive_head(x)

    def forward_loss(self, features: torch.Tensor, reconstruction, contrastive, mask):
        """Weighted MSE + InfoNCE on the masked tokens only; returns (loss, metrics)."""
        target = masked_tokens(self.patchify(features), mask)  # [B, M, patch_dim]
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


class MultiScaleMAE(MAEAST):
    """MAE-AST on a MAST: the masked tokens stay in the encoder as the mask token (the module's
    docstring says why); the decoder runs on the first-stage grid, from the last stage's latents."""

    def patch_dim(self) -> int:
        return MAST_PATCH[0] ** 2  # the 7x7 a token's embedding reads

    def mask_width(self) -> int:
        return self.config.stage_widths[0]  # the mask token goes into the encoder's first stage

    def patchify(self, features: torch.Tensor) -> torch.Tensor:
        return mast.patchify(features)

    def forward_encoder(self, features: torch.Tensor, noise: torch.Tensor | None = None):
        """[B, T, F] -> last-stage latents [B, N', D], mask [B, N], ids_restore [B, N]: for each
        first-stage token, the latent whose cell holds it."""
        x, grid = self.encoder.embed(features)  # [B, N, C], grid (T', F')
        if noise is None:
            noise = self.noise(x.shape[0], grid)
        mask = mask_of(torch.rand(x.shape[:2]) if noise is None else noise, self.mask_ratio).to(x.device)
        x = torch.where(mask[..., None].bool(), self.mask_token.to(x.dtype), x)
        ids_restore = mast.coarse_index(grid, len(self.config.stages) - 1, x.device).expand(x.shape[0], -1)
        return self.encoder.forward_blocks(x, grid), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor):
        x = torch.gather(latent, 1, ids_restore[:, :, None].expand(-1, -1, latent.shape[-1]))  # [B, N', D] -> [B, N, D]
        return self.decode(x)
