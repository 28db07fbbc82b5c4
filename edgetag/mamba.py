"""SSAMBA's encoder block: a bidirectional Mamba mixer in plain PyTorch (Shams et al., SLT 2024;
Gu & Dao 2023; the "v2" bidirectional layout of hustvl/Vim).

A block is Add -> LayerNorm -> Mixer, with no MLP. The mixer projects each token to x and a gate
z, runs x through two selective state-space models, one over the sequence and one over its
reverse (each with its own causal conv, x/dt projections, A and D; the in and out projections
are shared), averages them and gates with silu(z).

The selective scan h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t is a linear
recurrence, so it runs as an associative scan: log2(L) rounds of elementwise work on [B, L, E, N]
instead of a Python loop over L (`selective_scan_reference`, the oracle the tests hold it to).
Inputs are scanned in chunks, the state carried across, so the working set stays cache-sized
(and memory grows with the chunk, not with L); in training its backward recomputes the states
rather than keeping them. mamba-ssm's CUDA kernel is used when it is importable and the input is on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Tokens scanned at once: on a CPU the scan is bound by memory traffic, not arithmetic, so chunks
# whose [chunk, E, N] states per clip stay near the caches' size run several times faster than
# one scan over the whole input (measured here at E=256, N=16: 1 x 4000 tokens 40 ms in chunks of
# 128 against 100-113 ms whole; 8 x 512 tokens 65 ms in chunks of 32 against 190-220 ms); the
# chunk follows the per-clip size, not the batch, so a dynamic batch exports cleanly.
SCAN_ELEMENTS = 2**18


def associative_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_{t-1} + b_t along dim 1, h_{-1} = 0: [B, L, ...] -> h [B, L, ...].

    Pairs of steps combine into one step of half the sequence ((a, b) then (a', b') is
    (a' a, a' b + b')); the half-length scan gives h at the odd positions and one more step the
    even ones. O(L) work in log2(L) rounds, out of place (autograd and tracing see plain ops), any L.
    """
    L = a.shape[1]
    if L == 1:
        return b
    if L % 2:  # an identity step at the end (a = 1, b = 0) makes the pairs whole
        a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        b = torch.cat([b, torch.zeros_like(b[:, :1])], dim=1)
    a_even, a_odd, b_even, b_odd = a[:, 0::2], a[:, 1::2], b[:, 0::2], b[:, 1::2]
    h_odd = associative_scan(a_odd * a_even, a_odd * b_even + b_odd)  # h at 1, 3, 5, ...
    h_even = torch.cat([b_even[:, :1], a_even[:, 1:] * h_odd[:, :-1] + b_even[:, 1:]], dim=1)  # h at 0, 2, 4, ...
    h = torch.stack([h_even, h_odd], dim=2)  # [B, L/2, 2, ...]
    return h.flatten(1, 2)[:, :L]


def scan_chunk(inner: int, d_state: int) -> int:
    """Tokens per chunk: the power of two whose states per clip fit SCAN_ELEMENTS."""
    return 2 ** max(0, int(math.log2(max(1, SCAN_ELEMENTS // (inner * d_state)))))


def selective_scan(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor,
                   chunk: int | None = None) -> torch.Tensor:
    """Mamba's selective scan. u, dt [B, L, E]; A [E, N]; B, C [B, L, N]; D [E] -> y [B, L, E].

    With gradients, a backward of its own (`SelectiveScan`) keeps only the inputs and each
    chunk's entering state, as mamba-ssm's kernel does: autograd through the scan would keep
    every [B, L, E, N] intermediate of every layer (tens of GiB for a batch of 10 s crops)."""
    if u.is_cuda and _cuda_scan is not None:
        y = _cuda_scan(u.transpose(1, 2).contiguous(), dt.transpose(1, 2).contiguous(), A.contiguous(),
                       B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float())
        return y.transpose(1, 2)
    chunk = chunk or scan_chunk(*A.shape)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (u, dt, A, B, C, D)):
        return SelectiveScan.apply(u, dt, A, B, C, D, chunk)
    return scan_forward(u, dt, A, B, C, D, chunk)[0]


def scan_forward(u, dt, A, B, C, D, chunk: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """y, and the state entering each chunk (zeros for the first) [B, E, N]."""
    ys, starts = [], [u.new_zeros(u.shape[0], *A.shape)]
    for start in range(0, u.shape[1], chunk):
        part = slice(start, start + chunk)
        dA = torch.exp(dt[:, part, :, None] * A)  # [B, l, E, N]
        dBu = (dt[:, part] * u[:, part])[..., None] * B[:, part, None, :]  # [B, l, E, N]
        if start:  # the state carried in from the previous chunk enters at its first step
            dBu = torch.cat([dBu[:, :1] + dA[:, :1] * starts[-1][:, None], dBu[:, 1:]], dim=1)
        states = associative_scan(dA, dBu)  # [B, l, E, N]
        starts.append(states[:, -1])
        ys.append((states @ C[:, part, :, None]).squeeze(-1))  # [B, l, E]: a batched MatMul, which every ONNX parser takes
    return torch.cat(ys, dim=1) + u * D, starts[:-1]


class SelectiveScan(torch.autograd.Function):
    """The scan's backward is a scan too, run in reverse: with g_t = dL/dh_t,
    g_t = C_t dy_t + a_{t+1} g_{t+1}; then dL/db_t = g_t and dL/da_t = g_t h_{t-1}, from which the
    inputs' gradients follow by the chain rule (a = exp(dt A), b = dt u B). Chunk by chunk from
    the end, each chunk's states recomputed from its entering state."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, chunk):
        y, starts = scan_forward(u, dt, A, B, C, D, chunk)
        ctx.save_for_backward(u, dt, A, B, C, D, *starts)
        ctx.chunk = chunk
        return y

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, D, *starts = ctx.saved_tensors
        du, ddt, dB, dC = dy * D, torch.zeros_like(dt), torch.zeros_like(B), torch.zeros_like(C)
        dA, carry = torch.zeros_like(A), None  # carry: a g at the first step of the chunk after
        for k in reversed(range(len(starts))):
            part = slice(k * ctx.chunk, (k + 1) * ctx.chunk)
            a = torch.exp(dt[:, part, :, None] * A)  # [B, l, E, N]
            dtu = dt[:, part] * u[:, part]  # [B, l, E]
            b = dtu[..., None] * B[:, part, None, :]
            b = torch.cat([b[:, :1] + a[:, :1] * starts[k][:, None], b[:, 1:]], dim=1)
            h = associative_scan(a, b)  # [B, l, E, N]
            h_before = torch.cat([starts[k][:, None], h[:, :-1]], dim=1)
            c = dy[:, part, :, None] * C[:, part, None, :]  # dL/dh_t through y_t
            if carry is not None:
                c = torch.cat([c[:, :-1], c[:, -1:] + carry[:, None]], dim=1)
            a_after = torch.cat([a[:, 1:], torch.ones_like(a[:, :1])], dim=1)  # a_{t+1}; the last step's is in the carry
            g = associative_scan(a_after.flip(1), c.flip(1)).flip(1)  # [B, l, E, N]
            carry = a[:, 0] * g[:, 0]
            da_dlog = g * h_before * a  # dL/d(dt A)
            ddt[:, part] = (da_dlog * A).sum(-1) + (g * B[:, part, None, :]).sum(-1) * u[:, part]
            dA += (da_dlog * dt[:, part, :, None]).sum((0, 1))
            du[:, part] += (g * B[:, part, None, :]).sum(-1) * dt[:, part]
            dB[:, part] = (g * dtu[..., None]).sum(2)
            dC[:, part] = (dy[:, part, :, None] * h).sum(2)
        return du, ddt, dA, dB, dC, (dy * u).sum((0, 1)), None


def selective_scan_reference(u, dt, A, B, C, D) -> torch.Tensor:
    """The recurrence step by step (mamba-ssm's selective_scan_ref without its options): the oracle."""
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # [B, E, N]
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + u * D


def _import_cuda_scan():
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # not installed, or installed without its CUDA extension (CPU-only machines)
        return None
    return selective_scan_fn


_cuda_scan = _import_cuda_scan()


class SelectiveSSM(nn.Module):
    """One direction of the mixer: causal depthwise conv, silu, input-dependent dt, B, C; the scan.
    Mamba's initialisation: A = -(1..N) per channel (S4D-real), dt between 1e-3 and 0.1."""

    def __init__(self, inner: int, d_state: int, d_conv: int, dt_rank: int, dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.d_state, self.dt_rank = d_state, dt_rank
        self.conv1d = nn.Conv1d(inner, inner, d_conv, groups=inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, inner)
        nn.init.uniform_(self.dt_proj.weight, -dt_rank**-0.5, dt_rank**-0.5)
        dt = torch.exp(torch.rand(inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(inner, 1))  # [E, N]
        self.D = nn.Parameter(torch.ones(inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = x.shape[1]
        x = F.silu(self.conv1d(x.transpose(1, 2))[..., :L].transpose(1, 2))  # [B, L, E]; padding on both ends, keep the causal part
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(dt))  # [B, L, E]
        # in float32 under bf16 autocast too: the state sums hundreds of decayed terms (mamba-ssm's kernel does the same)
        y = selective_scan(x.float(), dt.float(), -torch.exp(self.A_log.float()), B.float(), C.float(), self.D.float())
        return y.to(x.dtype)


class BiMamba(nn.Module):
    """Bidirectional Mamba, Vim's "v2": shared in/out projections, one SSM per direction."""

    def __init__(self, width: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        inner, dt_rank = expand * width, math.ceil(width / 16)
        self.in_proj = nn.Linear(width, 2 * inner, bias=False)
        self.forward_ssm = SelectiveSSM(inner, d_state, d_conv, dt_rank)
        self.backward_ssm = SelectiveSSM(inner, d_state, d_conv, dt_rank)
        self.out_proj = nn.Linear(inner, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, z = self.in_proj(x).chunk(2, dim=-1)  # each [B, L, E]
        # the gate is elementwise, so gating the mean equals the reference's mean of gated outputs
        y = (self.forward_ssm(x) + self.backward_ssm(x.flip(1)).flip(1)) / 2
        return self.out_proj(y * F.silu(z))


class MambaBlock(nn.Module):
    """Add -> LayerNorm -> Mixer: a pre-LN residual block with no MLP."""

    def __init__(self, width: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, norm_eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=norm_eps)
        self.mixer = BiMamba(width, d_state, d_conv, expand)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))
