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

Tasks added to a frozen base (`TaskConfig`) own a head and, unless they are linear probes, their
adapters in the last blocks: one pass runs the base's blocks once, and each adapted task leaves
that trunk at its first adapted block to run the rest with its own adapters.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from edgetag.mamba import MambaBlock
from edgetag.mast import MultiScaleEncoder
from edgetag.mobilenet import MobileNetEncoder, fold_batch_norms
from edgetag.spec import CONV_STEM_LAYERS, TAGS, EncoderConfig, ModelSpec, TaskConfig

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


class BlockAdapters(nn.Module):
    """One block's adapters (EncoderConfig.adapter's placements): `adapter` beside the MLP and,
    for "aat" and "conv", `adapter_attn` on attention. A Block holds its own the same way; a
    task brings its own for the blocks it adapts."""

    def __init__(self, width: int, adapter_dim: int, adapter: str, grid: tuple[int, int]):
        super().__init__()
        self.sequential = adapter == "aat"  # AAT's attention adapter reads attention's output; ConvPass's its input
        make = (lambda: ConvAdapter(width, adapter_dim, grid)) if adapter == "conv" else (lambda: Adapter(width, adapter_dim))
        self.adapter = make() if adapter_dim else None
        self.adapter_attn = make() if adapter_dim and adapter != "mlp" else None


class Block(BlockAdapters):
    """A transformer block. `grid` (frequency rows, cls tokens) is the token grid FTA and conv
    adapters work on; `adapter` places adapters of width `adapter_dim` (EncoderConfig.adapter).
    `forward(x, adapters)` runs it with a task's adapters instead of its own."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, norm_first: bool = True, norm_eps: float = 1e-6, adapter_dim: int = 0,
                 adapter: str = "mlp", attention: str = "full", grid: tuple[int, int] = (1, 0)):
        super().__init__(width, adapter_dim, adapter, grid)
        self.norm_first = norm_first
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, grid if attention == "fta" else None)
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def attend(self, x: torch.Tensor, a: BlockAdapters) -> torch.Tensor:
        out = self.attn(x)
        if a.adapter_attn is None:
            return out
        return out + a.adapter_attn(out if a.sequential else x)

    def feed_forward(self, x: torch.Tensor, a: BlockAdapters) -> torch.Tensor:
        return self.mlp(x) if a.adapter is None else self.mlp(x) + a.adapter(x)

    def forward(self, x: torch.Tensor, adapters: BlockAdapters | None = None) -> torch.Tensor:
        a = self if adapters is None else adapters
        if self.norm_first:
            x = x + self.attend(self.norm1(x), a)
            return x + self.feed_forward(self.norm2(x), a)
        x = self.norm1(x + self.attend(x, a))
        return self.norm2(x + self.feed_forward(x, a))


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

    def check(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] < self.config.patch_time:
            raise ValueError(f"need at least {self.config.patch_time} frames, got {features.shape[1]}")
        return features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.forward_blocks(self.embed(self.check(features)))

    def forward_tasks(self, features: torch.Tensor, branches: dict[str, TaskBranch], trunk: bool = True) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Token outputs of the base (`trunk`; None when not asked) and of each adapted task, the
        base's blocks run once: a task takes the trunk's tokens at its first adapted block and
        runs the blocks from there with its own adapters."""
        x = self.norm_pre(self.embed(self.check(features)))
        stop = len(self.blocks) if trunk else max((b.first for b in branches.values()), default=0)
        entering: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[:stop]):
            entering[i] = x
            x = block(x)
        entering[stop] = x
        out = {name: self.forward_branch(entering[branch.first], branch) for name, branch in branches.items()}
        return (self.norm(x) if trunk else None), out

    @property
    def split_layers(self) -> int:
        return len(self.blocks)

    def forward_trunk(self, features: torch.Tensor, stop: int) -> torch.Tensor:
        """The tokens entering block `stop`: what a task adapted from there on reads (a frozen
        base's, so `edgetag learn` computes them once per view)."""
        x = self.norm_pre(self.embed(self.check(features)))
        for block in self.blocks[:stop]:
            x = block(x)
        return x

    def forward_from(self, x: torch.Tensor, start: int, adapters: nn.ModuleDict | None = None) -> torch.Tensor:
        """Token outputs from the tokens entering block `start`, with a task's adapters (keyed by
        block index) where given."""
        for i in range(start, len(self.blocks)):
            x = self.blocks[i](x) if adapters is None else self.blocks[i](x, adapters[str(i)])
        return self.norm(x)

    def forward_branch(self, x: torch.Tensor, branch: TaskBranch) -> torch.Tensor:
        """A task's token outputs from the tokens entering its first adapted block."""
        return self.forward_from(x, branch.first, branch.blocks)


# ---------------------------------------------------------------------------------------------
# Heads and the runtime model

class Head(nn.Module):
    """SSAST's mlp_head: LayerNorm, then a linear layer, on the mean-pooled tokens (without the
    norm: EfficientAT's classifier)."""

    def __init__(self, width: int, classes: int, eps: float = 1e-6, norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps) if norm else nn.Identity()
        self.fc = nn.Linear(width, classes)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(pooled))


def new_head(width: int, kind: str, classes: int, eps: float = 1e-6, norm: bool = True) -> Head:
    head = Head(width, classes, eps, norm)
    if kind == TAGS and classes > 1:
        # Start each sigmoid at the prior of one active class in len(labels): otherwise the
        # first stretch of training only learns to say "no" to every class, and a short budget
        # never gets past it (measured on ESC-50).
        nn.init.constant_(head.fc.bias, -math.log(classes - 1))
    return head


class TaskBranch(nn.Module):
    """A task's weights (`TaskConfig`): adapters for the encoder's last `layers` blocks, keyed by
    block index, and its head."""

    def __init__(self, c: EncoderConfig, task: TaskConfig):
        super().__init__()
        self.first = c.depth - task.layers
        grid = (c.freq_patches, c.cls_tokens)
        self.blocks = nn.ModuleDict({str(i): BlockAdapters(c.width, task.adapter_dim, task.adapter, grid) for i in range(self.first, c.depth)})
        self.head = new_head(c.width, task.head.kind, len(task.head.labels), c.norm_eps, c.head_norm)


def new_encoder(config: EncoderConfig) -> nn.Module:
    """The encoder `config.encoder` names: features [B, T, n_mels] -> tokens [B, N, width]."""
    return {"mobilenet": MobileNetEncoder, "mast": MultiScaleEncoder}.get(config.encoder, Encoder)(config)


class AudioTransformer(nn.Module):
    """Encoder and heads: normalised features [B, T, n_mels] -> {head: logits [B, classes]}.

    Built from, and carrying, its `ModelSpec` (`self.spec`): what it needs to run besides its
    weights. With no heads it returns the pooled embedding under "embedding". Tasks answer under
    their names beside the heads (`spec.outputs`); `outputs` picks which are computed.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        c = spec.encoder
        self.encoder = new_encoder(c)
        self.heads = nn.ModuleDict({name: new_head(c.width, h.kind, len(h.labels), c.norm_eps, c.head_norm) for name, h in spec.heads.items()})
        self.tasks = nn.ModuleDict({name: TaskBranch(c, task) for name, task in spec.tasks.items()})

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Token outputs [B, N, width] -> [B, width]."""
        c = self.encoder.config
        return x[:, : c.cls_tokens].mean(dim=1) if c.pool == "cls" else x[:, c.cls_tokens :].mean(dim=1)

    def embedding(self, features: torch.Tensor) -> torch.Tensor:
        """Pooled token outputs of the base [B, width]."""
        return self.pool(self.encoder(features))

    def forward(self, features: torch.Tensor, outputs: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{name: logits} for the heads and tasks named in `outputs` (None: every one, `spec.outputs`)."""
        if not self.heads and not self.tasks:
            return {"embedding": self.embedding(features)}
        names = tuple(self.spec.outputs) if outputs is None else outputs
        unknown = [n for n in names if n not in self.spec.outputs]
        if unknown:
            raise KeyError(f"no head or task {', '.join(map(repr, unknown))}")
        adapted = {n: self.tasks[n] for n in names if n in self.tasks and len(self.tasks[n].blocks)}
        trunk, tokens = self.encoder.forward_tasks(features, adapted, trunk=any(n not in adapted for n in names))
        pooled = None if trunk is None else self.pool(trunk)
        out = {}
        for name in names:
            if name in self.heads:
                out[name] = self.heads[name](pooled)
            else:
                out[name] = self.tasks[name].head(self.pool(tokens[name]) if name in tokens else pooled)
        return out

    def probabilities(self, features: torch.Tensor, outputs: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """Sigmoid for tag heads, softmax for keyword heads."""
        logits = self.forward(features, outputs)
        if not self.heads and not self.tasks:
            return logits
        kinds = self.spec.outputs
        return {name: x.sigmoid() if kinds[name].kind == TAGS else x.softmax(dim=-1) for name, x in logits.items()}


def for_inference(model: AudioTransformer) -> AudioTransformer:
    """`model` as the torch backend runs it. A mobilenet becomes an eval-mode copy with its batch
    norms folded into its convolutions and its weights channels-last: the same outputs within
    1e-5, and 1.5x faster per hop on one CPU thread (mn04, one measurement here); the model itself,
    which training may go on changing, is left as it is. Other encoders run as they are."""
    if model.spec.encoder.encoder != "mobilenet":
        return model
    import copy

    inference = copy.deepcopy(model).eval()
    fold_batch_norms(inference.encoder)
    return inference.to(memory_format=torch.channels_last)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

