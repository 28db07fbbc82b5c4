"""The Audio Spectrogram Transformer encoder that runs on the device, and its heads, in torch
(their configs, `EncoderConfig` and `HeadConfig`, live in `edgetag.spec`, which needs no torch).
Its blocks are a transformer's, or SSAMBA's bidirectional Mamba blocks (`edgetag.mamba`) over the
same tokens, positions and heads. A transformer attends over every token, or (TI-CL's FTA) along
each token's frequency row and time column of the token grid; adapters for a frozen encoder go
beside its MLPs (AAT), after attention and beside the MLP (AAT's placement), or beside both as
convolutions over the grid (TI-CL's ConvPass).

Features [B, T, n_mels] are cut into tokens (16x16 patches or 128x2 frames, overlapping for
imported AST teachers; or the cells of a convolutional stem's output), ordered time-major as
MAE-AST does (all frequency patches of one time step, then the next), so a longer input only
appends tokens (patches and frames: a stem's last cells also see the frames after them). Positions are 1-D sinusoids over
the token index (MAE-AST; any length) or a learned table cropped to the input (SSAST, AST).
Heads read the mean of the token outputs, or of the cls tokens of an imported AST.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.mamba import MambaBlock
from edgetag.spec import CONV_STEM_LAYERS, TAGS, EncoderConfig, ModelSpec

# ---------------------------------------------------------------------------------------------
# Tokens


def patchify(features: torch.Tensor, config: EncoderConfig) -> torch.Tensor:
    """[B, T, F] -> [B, N, patch_time * patch_freq], time-major: all frequency patches of one
    time step, then the next, so a longer input only appends tokens; values inside a patch are
    time-major too. Trailing frames that fill no whole patch are dropped (as MAE-AST's Unfold
    does)."""
    B, T, Fr = features.shape
    pt, pf = config.patch_time, config.patch_freq
    t, f = config.time_patches(T), config.freq_patches
    if config.overlapping:
        x = features.unfold(1, pt, config.step_time).unfold(2, pf, config.step_freq)  # [B, t, f, pt, pf]
    else:  # plain reshapes: cheaper, and every exporter handles them
        x = features[:, : t * pt].reshape(B, t, pt, f, pf).permute(0, 1, 3, 2, 4)  # [B, t, f, pt, pf]
    return x.reshape(B, t * f, pt * pf)


def sincos_positions(n: int, width: int) -> torch.Tensor:
    """MAE-AST's 1-D sinusoids: sin on even channels, cos on odd, base 10000. [n, width]

    Cached in eager mode: every forward pass (every streaming hop) asks for the same table;
    callers only read it. While tracing (torch.compile, export) it is built afresh, so no
    traced tensor ever lands in the cache.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return _sincos(n, width)
    return _cached_sincos(n, width)


@lru_cache(maxsize=16)
def _cached_sincos(n: int, width: int) -> torch.Tensor:
    with torch.inference_mode(False):  # a table first made under inference_mode must serve training too
        return _sincos(n, width)


def _sincos(n: int, width: int) -> torch.Tensor:
    position = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
    pe = torch.zeros(n, width)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class ConvStem(nn.Module):
    """Four stride-2 3x3 convolutions (Xiao et al. 2021, "Early convolutions help transformers
    see better"): [B, T, F] -> [B, t * f, width] tokens, time-major, one per 16x16 cell as a
    patch gives, but shift-tolerant and seeing across cell edges, which a small model trained on
    a few thousand clips cannot learn from linear patches. Because a token sees its neighbours,
    masked pretraining (which hides tokens) needs patch or frame tokens instead."""

    def __init__(self, width: int):
        super().__init__()
        channels = [1] + [width // 2 ** (CONV_STEM_LAYERS - 1 - i) for i in range(CONV_STEM_LAYERS - 1)]  # 1, w/8, w/4, w/2
        layers: list[nn.Module] = []
        for a, b in zip(channels, channels[1:]):
            layers += [nn.Conv2d(a, b, 3, 2, 1, bias=False), nn.BatchNorm2d(b), nn.GELU()]
        self.layers = nn.Sequential(*layers, nn.Conv2d(channels[-1], width, 3, 2, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layers(features[:, None])  # [B, width, t, f]
        return x.flatten(2).transpose(1, 2)  # [B, t * f, width]


# ---------------------------------------------------------------------------------------------
# Transformer (timm's names, so SSAST weights load key by key)


class Attention(nn.Module):
    """Multi-head self-attention over every token, or FTA over a (time, frequency) token grid
    when given `grid` (its frequency rows and the cls tokens before it)."""

    def __init__(self, width: int, heads: int, grid: tuple[int, int] | None = None):
        super().__init__()
        self.heads, self.grid = heads, grid
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads)  # [B, N, 3, H, C/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, N, C/H]
        x = F.scaled_dot_product_attention(q, k, v) if self.grid is None else factorised_attention(q, k, v, *self.grid)  # [B, H, N, C/H]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def grid_columns(n: int, freq: int, cls: int) -> int:
    """Time columns t of a token sequence of n = cls + t * freq (cls tokens first); a count that
    is not such a grid is an error, never a truncation."""
    t = (n - cls) // freq
    if cls + t * freq != n:
        raise ValueError(f"{n - cls} tokens are not a grid of {freq} frequency rows")
    return t


def factorised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freq: int, cls: int = 0) -> torch.Tensor:
    """TI-CL's frequency-time factorised attention (FTA) as row attention plus column attention.

    q, k, v [B, H, cls + t * freq, d], the patch tokens a time-major (t, freq) grid. A patch
    attends to the cls tokens, its frequency row (its f, every t) and its time column (its t,
    every f), itself once: one softmax over those t + freq - 1 + cls keys, which is full
    attention under the equivalent -inf mask, at t + freq + cls scores per query instead of
    cls + t * freq. (TI-CL's released code multiplies the full N x N logits by a 0/1 mask: the
    cost stays, and masked pairs keep logit 0.) cls tokens attend to every token.
    """
    B, H, N, d = q.shape
    t = grid_columns(N, freq, cls)
    grid = lambda a: a[:, :, cls:].reshape(B, H, t, freq, d)  # noqa: E731  [B, H, t, f, d]
    qp, kp, vp = grid(q * d**-0.5), grid(k), grid(v)
    rows = (qp.transpose(2, 3) @ kp.transpose(2, 3).transpose(-1, -2)).transpose(2, 3)  # [B, H, t, f, t']: same f
    columns = (qp @ kp.transpose(-1, -2)).masked_fill(torch.eye(freq, dtype=torch.bool, device=q.device), float("-inf"))  # [B, H, t, f, f']: same t, self in rows
    kc, vc = k[:, :, None, :cls], v[:, :, None, :cls]  # [B, H, 1, cls, d]
    scores = torch.cat([rows, columns, qp @ kc.transpose(-1, -2)], dim=-1).softmax(dim=-1)  # [B, H, t, f, t' + f' + cls]
    a_rows, a_columns, a_cls = scores.split([t, freq, cls], dim=-1)
    out = (a_rows.transpose(2, 3) @ vp.transpose(2, 3)).transpose(2, 3) + a_columns @ vp + a_cls @ vc  # [B, H, t, f, d]
    out = out.reshape(B, H, t * freq, d)
    if not cls:
        return out
    return torch.cat([F.scaled_dot_product_attention(q[:, :, :cls], k, v), out], dim=2)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Adapter(nn.Module):
    """A bottleneck (AAT): trained while the encoder stays frozen. The up projection starts at
    zero, so an untrained adapter leaves the encoder unchanged."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.gelu(self.down(x)))


class ConvAdapter(nn.Module):
    """TI-CL's convolutional adapter (ConvPass): a bottleneck with a 3x3 convolution over the
    (time, frequency) token grid between its projections, so the adapter sees each token's
    neighbours, which a frozen encoder's token-wise MLP cannot add. The convolution starts as
    the identity (ConvPass's init) and the up projection at zero: an untrained adapter leaves
    the encoder unchanged. A cls token has no neighbours: it meets only the centre tap, as a
    1x1 grid (ConvPass does the same)."""

    def __init__(self, width: int, bottleneck: int, grid: tuple[int, int], dropout: float = 0.1):
        super().__init__()
        self.freq, self.cls = grid
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv2d(bottleneck, bottleneck, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, width)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, 1, 1] = torch.eye(bottleneck)
            self.conv.bias.zero_()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        c, f = self.cls, self.freq
        t = grid_columns(N, f, c)
        h = F.gelu(self.down(x))  # [B, N, d]
        cells = h[:, c:].reshape(B, t, f, -1).permute(0, 3, 1, 2)  # [B, d, t, f]
        cells = self.conv(cells).permute(0, 2, 3, 1).reshape(B, t * f, -1)  # [B, t * f, d]
        if c:
            cells = torch.cat([F.linear(h[:, :c], self.conv.weight[:, :, 1, 1], self.conv.bias), cells], dim=1)
        return self.up(self.dropout(F.gelu(cells)))


class Block(nn.Module):
    """A transformer block. `grid` (frequency rows, cls tokens) is the token grid FTA and conv
    adapters work on; `adapter` places adapters of width `adapter_dim` (EncoderConfig.adapter)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, norm_first: bool = True, norm_eps: float = 1e-6, adapter_dim: int = 0,
                 adapter: str = "mlp", attention: str = "full", grid: tuple[int, int] = (1, 0)):
        super().__init__()
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, grid if attention == "fta" else None)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.sequential = adapter == "aat"  # AAT's attention adapter reads attention's output; ConvPass's its input
        make = (lambda: ConvAdapter(width, adapter_dim, grid)) if adapter == "conv" else (lambda: Adapter(width, adapter_dim))
        self.adapter = make() if adapter_dim else None
        self.adapter_attn = make() if adapter_dim and adapter != "mlp" else None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(x)
        if self.adapter_attn is None:
            return a
        return a + self.adapter_attn(a if self.sequential else x)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) if self.adapter is None else self.mlp(x) + self.adapter(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attend(self.norm1(x))
            return x + self.feed_forward(self.norm2(x))
        x = self.norm1(x + self.attend(x))
        return self.norm2(x + self.feed_forward(x))


class Encoder(nn.Module):
    """Features [B, T, n_mels] -> token outputs [B, N, width]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        if c.tokens == "conv":
            self.stem = ConvStem(c.width)
        else:
            self.patch_embed = nn.Linear(c.patch_dim, c.width)
        if c.cls_tokens:
            self.cls_token = nn.Parameter(torch.randn(1, c.cls_tokens, c.width) * 0.02)
        if c.positions == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, c.max_tokens, c.width) * 0.02)
        # A post-LN stack normalises its input (fairseq); a pre-LN stack its output.
        self.norm_pre = nn.Identity() if c.norm_first else nn.LayerNorm(c.width, eps=c.norm_eps)
        if c.encoder == "mamba":
            self.blocks = nn.ModuleList(MambaBlock(c.width, c.d_state, c.d_conv, c.expand, c.norm_eps) for _ in range(c.depth))
        else:
            grid = (c.freq_patches, c.cls_tokens)
            self.blocks = nn.ModuleList(Block(c.width, c.heads, c.mlp_ratio, c.norm_first, c.norm_eps, c.adapter_dim, c.adapter, c.attention, grid) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width, eps=c.norm_eps) if c.norm_first else nn.Identity()

    def positions(self, n: int) -> torch.Tensor:
        """[1, n, width] position embeddings for the first n tokens (cls tokens included)."""
        c = self.config
        if c.positions == "learned":
            if n > c.max_tokens:  # tokens are time-major: a shorter input uses the first rows
                raise ValueError(f"{n} tokens do not fit the learned position table ({c.max_tokens})")
            return self.pos_embed[:, :n]
        return sincos_positions(n, c.width).to(next(self.parameters()))[None]

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """Tokens with positions: [B, T, n_mels] -> [B, cls_tokens + N, width]."""
        x = self.stem(features) if self.config.tokens == "conv" else self.patch_embed(patchify(features, self.config))
        if self.config.cls_tokens:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.positions(x.shape[1])

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] < self.config.patch_time:
            raise ValueError(f"need at least {self.config.patch_time} frames, got {features.shape[1]}")
        return self.forward_blocks(self.embed(features))


# ---------------------------------------------------------------------------------------------
# Heads and the runtime model

class Head(nn.Module):
    """SSAST's mlp_head: LayerNorm, then a linear layer, on the mean-pooled tokens."""

    def __init__(self, width: int, classes: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.fc = nn.Linear(width, classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


class AudioTransformer(nn.Module):
    """Encoder and heads: normalised features [B, T, n_mels] -> {head: logits [B, classes]}.

    Built from, and carrying, its `ModelSpec` (`self.spec`): what it needs to run besides its
    weights. With no heads it returns the pooled embedding under "embedding".
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.encoder = Encoder(spec.encoder)
        self.heads = nn.ModuleDict({name: Head(spec.encoder.width, len(h.labels), spec.encoder.norm_eps) for name, h in spec.heads.items()})
        for name, h in spec.heads.items():
            if h.kind == TAGS and len(h.labels) > 1:
                # Start each sigmoid at the prior of one active class in len(labels): otherwise
                # the first stretch of training only learns to say "no" to every class, and a
                # short budget never gets past it (measured on ESC-50).
                nn.init.constant_(self.heads[name].fc.bias, -math.log(len(h.labels) - 1))

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled token outputs [B, width]."""
        c = self.encoder.config
        x = self.encoder(features)
        return x[:, : c.cls_tokens].mean(dim=1) if c.pool == "cls" else x[:, c.cls_tokens :].mean(dim=1)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.embedding(features)
        if not self.heads:
            return {"embedding": pooled}
        return {name: head(pooled) for name, head in self.heads.items()}

    def probabilities(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sigmoid for tag heads, softmax for keyword heads."""
        logits = self.forward(features)
        if not self.heads:
            return logits
        return {name: x.sigmoid() if self.spec.heads[name].kind == TAGS else x.softmax(dim=-1) for name, x in logits.items()}


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

