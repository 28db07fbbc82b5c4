"""Inference backends behind one small interface: normalised fbank windows [B, T, n_mels] in,
per-head probabilities out (sigmoid for tag heads, softmax for keyword heads).

A backend also tells what it serves: `heads` (name -> HeadConfig), `fbank` and the stream
settings (`window`, `hop` in seconds) from the checkpoint it was built from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgetag.checkpoint import load_model
from edgetag.features import FbankConfig
from edgetag.model import HeadConfig

DEFAULT_WINDOW, DEFAULT_HOP = 1.0, 0.5  # seconds, for checkpoints without "stream" settings


class Backend:
    heads: dict[str, HeadConfig]
    fbank: FbankConfig
    window: float
    hop: float
    name: str

    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError


class TorchBackend(Backend):
    """The checkpoint's model in eager PyTorch (fp32)."""

    name = "torch"

    def __init__(self, path, device: str = "cpu"):
        self.model = load_model(path, device)
        self.device = device
        self.heads = dict(self.model.head_configs)
        self.fbank = self.model.fbank
        stream = self.model.config.get("stream", {})
        self.window, self.hop = stream.get("window", DEFAULT_WINDOW), stream.get("hop", DEFAULT_HOP)
        self.thresholds = self.model.config.get("thresholds", {})
        self.model_id = self.model.config.get("provenance", {}).get("id", Path(path or "model").stem)

    @torch.inference_mode()
    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        probs = self.model.probabilities(windows.to(self.device))
        return {name: p.float().cpu().numpy() for name, p in probs.items()}


def load_backend(path, backend: str = "auto", device: str = "cpu") -> Backend:
    """A backend for the checkpoint at `path`; "auto" picks the fastest available one."""
    if backend in ("auto", "torch"):
        return TorchBackend(path, device)
    raise ValueError(f"unknown backend {backend!r}")
