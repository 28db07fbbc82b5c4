"""MAST (Ghosh et al., ICASSP 2023): a multiscale transformer on the log-mel, MViTv2's blocks.

Early blocks see many tokens at a small width; each later stage halves the token grid in time and
frequency and doubles the width and the heads, so the deep blocks, where most of the layers are,
run on few tokens. A convolutional patch embedding (7x7, stride 10x10: one token per 100 ms and 10
mel bands) makes the first grid; then per block, MViTv2's pooling attention:

- queries pooled (a depthwise 3x3 convolution, stride 2x2) in a stage's first block, which is
  where the grid halves; the shortcut is max-pooled alike and, where the width doubles, projected;
- keys and values always pooled to a coarser grid (stride 4 in the first stage, halved with each
  stage, at least 1), the attention's main saving at high resolution;
- residual pooling (the pooled queries added to the attention's output) and decomposed relative
  positions (a learned vector per frequency offset and per time offset, dotted with the query)
  instead of absolute positions, so any window length runs.

Tokens are [B, N, C] in the project's time-major order (N = T x F); a block takes the grid (T, F)
and returns its own. The output is every last-stage token; heads read their mean. Tasks on a MAST
are linear probes (`PooledEncoder`): its blocks change width, which adapters do not follow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.pooled import PooledEncoder
from edgetag.spec import MAST_KV_STRIDE, MAST_PATCH, EncoderConfig, mast_grid, strided

REL_TIME = 32  # time offsets (in tokens of the finer grid) beyond this share the last relative-position row


class Pool(nn.Module):
    """MViTv2's pooling of queries, keys or values: a depthwise 3x3 convolution at `stride` over
    each head's (T, F) grid, then LayerNorm."""

    def __init__(self, dim: int, stride: int, eps: float):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(dim, dim, 3, stride, 1, groups=dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        H, d = x.shape[1], x.shape[3]
        x = x.reshape(-1, *grid, d).permute(0, 3, 1, 2)  # [B, H, T*F, d] -> [B*H, d, T, F]
        x = self.conv(x)  # [B*H, d, T', F']
        T, Fr = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2).reshape(-1, H, T * Fr, d)), (T, Fr)


def relative_index(q: int, k: int, extent: int, device: torch.device) -> torch.Tensor:
    """[q, k] rows of a relative-position table of 2 extent + 1 rows: the offset of query i from
    key j on the finer of the two grids (the coarser one scaled to it, as MViTv2 does), clamped."""
    ratio = max(k / q, 1.0), max(q / k, 1.0)
    offset = torch.arange(q, device=device)[:, None] * ratio[0] - torch.arange(k, device=device)[None, :] * ratio[1]
    return offset.round().long().clamp(-extent, extent) + extent


class PoolingAttention(nn.Module):
    def __init__(self, dim: int, dim_out: int, heads: int, stride_q: int, stride_kv: int, freq_extent: int, eps: float):
        super().__init__()
        self.heads, d = heads, dim_out // heads
        self.qkv = nn.Linear(dim, 3 * dim_out)
        self.proj = nn.Linear(dim_out, dim_out)
        self.pool_q, self.pool_k, self.pool_v = Pool(d, stride_q, eps), Pool(d, stride_kv, eps), Pool(d, stride_kv, eps)
        self.freq_extent = freq_extent
        self.rel_pos_f = nn.Parameter(torch.zeros(2 * freq_extent + 1, d))
        self.rel_pos_t = nn.Parameter(torch.zeros(2 * REL_TIME + 1, d))
        nn.init.trunc_normal_(self.rel_pos_f, std=0.02)
        nn.init.trunc_normal_(self.rel_pos_t, std=0.02)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # [3, B, H, N, d]
        q, q_grid = self.pool_q(qkv[0], grid)
        k, k_grid = self.pool_k(qkv[1], grid)
        v, _ = self.pool_v(qkv[2], grid)
        (Tq, Fq), (Tk, Fk) = q_grid, k_grid
        # decomposed relative positions: q . R_t[t_q - t_k] + q . R_f[f_q - f_k]
        r = q.reshape(B, self.heads, Tq, Fq, -1)  # [B, H, Tq, Fq, d]
        device = q.device
        rt = torch.einsum("bhtfd,tkd->bhtfk", r, self.rel_pos_t[relative_index(Tq, Tk, REL_TIME, device)])  # [B, H, Tq, Fq, Tk]
        rf = torch.einsum("bhtfd,fkd->bhtfk", r, self.rel_pos_f[relative_index(Fq, Fk, self.freq_extent, device)])  # [B, H, Tq, Fq, Fk]
        bias = (rt[..., :, None] + rf[..., None, :]).reshape(B, self.heads, Tq * Fq, Tk * Fk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias) + q  # residual pooling
        return self.proj(out.transpose(1, 2).reshape(B, Tq * Fq, -1)), q_grid


class MultiScaleBlock(nn.Module):
    def __init__(self, dim: int, dim_out: int, heads: int, mlp_ratio: float, stride_q: int, stride_kv: int, freq_extent: int, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = PoolingAttention(dim, dim_out, heads, stride_q, stride_kv, freq_extent, eps)
        # the shortcut follows the grid and the width: max-pooled where queries are, projected
        # (from the normalised input, as MViTv2) where the width doubles
        self.shortcut_proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.shortcut_pool = nn.MaxPool2d(3, stride_q, 1) if stride_q > 1 else None
        self.norm2 = nn.LayerNorm(dim_out, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dim_out, int(dim_out * mlp_ratio)), nn.GELU(), nn.Linear(int(dim_out * mlp_ratio), dim_out))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        normed = self.norm1(x)
        y, out_grid = self.attn(normed, grid)
        if self.shortcut_proj is not None:
            x = self.shortcut_proj(normed)
        if self.shortcut_pool is not None:
            B, N, C = x.shape
            x = self.shortcut_pool(x.transpose(1, 2).reshape(B, C, *grid)).flatten(2).transpose(1, 2)  # [B, C, T, F] -> [B, T'F', C]
        x = x + y
        return x + self.mlp(self.norm2(x)), out_grid


class MultiScaleEncoder(PooledEncoder):
    """Features [B, T, n_mels] -> last-stage tokens [B, N, width]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        kernel, stride = MAST_PATCH
        widths, heads = c.stage_widths, c.stage_heads
        self.patch_embed = nn.Conv2d(1, widths[0], kernel, stride, kernel // 2)
        blocks, dim, kv, freq = [], widths[0], MAST_KV_STRIDE, mast_grid(c.n_mels)
        for s, layers in enumerate(c.stages):
            for i in range(layers):
                first = s > 0 and i == 0
                if first:
                    kv = max(1, kv // 2)
                extent = freq - 1  # the largest frequency offset this block's grids can have
                blocks.append(MultiScaleBlock(dim, widths[s], heads[s], c.mlp_ratio, 2 if first else 1, kv, extent, c.norm_eps))
                if first:
                    freq = strided(freq, 2)
                dim = widths[s]
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps)

    def embed(self, features: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """[B, T, n_mels] -> first-stage tokens [B, T'F', C] (time-major) and their grid (T', F')."""
        x = self.patch_embed(features[:, None])  # [B, 1, T, F] -> [B, C, T', F']
        return x.flatten(2).transpose(1, 2), tuple(x.shape[2:])

    def forward_blocks(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """First-stage tokens on `grid` -> last-stage tokens [B, N', width]."""
        for block in self.blocks:
            x, grid = block(x, grid)
        return self.norm(x)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(*self.embed(self.check(features)))


def patchify(features: torch.Tensor) -> torch.Tensor:
    """What each first-stage token's patch embedding reads: [B, T, F] -> [B, T'F', 7 * 7], tokens
    time-major like the embedding's output, values time-major inside a patch. (The 7x7 kernels
    sit 10 apart, so the rows and columns between them reach no token.)"""
    kernel, stride = MAST_PATCH
    return F.unfold(features[:, None], kernel, padding=kernel // 2, stride=stride).transpose(1, 2)  # [B, 49, T'F'] -> [B, T'F', 49]


def coarse_index(grid: tuple[int, int], halvings: int, device: torch.device | None = None) -> torch.Tensor:
    """[T'F'] index, for each first-stage token on `grid`, of the last-stage token whose cell holds
    it, after `halvings` stride-2 poolings (a same-padded stride-2 pooling keeps ceil(n / 2) rows,
    so the last grid is ceil(n / 2**halvings) and cell i holds rows [i 2**halvings, (i + 1) 2**halvings))."""
    (T, Fr), s = grid, 2**halvings
    t, f = torch.arange(T, device=device)[:, None] // s, torch.arange(Fr, device=device)[None, :] // s
    return (t * strided(Fr, s) + f).flatten()
