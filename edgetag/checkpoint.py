"""One checkpoint format: a single .safetensors file, weights plus a JSON config in its header.

The config holds everything needed to rebuild and feed the model: the encoder, the fbank recipe
(features must be computed the way the model was trained), the heads with their labels, any
streaming settings and thresholds, and where the weights came from. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from edgetag.features import FbankConfig
from edgetag.model import AudioTransformer, EncoderConfig, HeadConfig

FORMAT = "edgetag/1"
METADATA_KEY = "edgetag"
DEFAULT_MODEL = Path(__file__).parent / "assets" / "model.safetensors"
DEFAULT_EXPORT = DEFAULT_MODEL.parent / "export"  # its ONNX export (deploy.export), for --backend onnx


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; `str()` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


def model_config(model: AudioTransformer, fbank: FbankConfig, **extra) -> dict:
    """The plain-dict config saved beside the weights."""
    return {
        "format": FORMAT,
        "encoder": model.encoder.config.to_dict(),
        "fbank": fbank.to_dict(),
        "heads": {name: {"kind": h.kind, "labels": list(h.labels)} for name, h in model.head_configs.items()},
        **extra,
    }


def save(path, model: AudioTransformer, fbank: FbankConfig, **extra) -> Path:
    """Write weights and config atomically (a crash never leaves half a checkpoint).

    `extra` holds further JSON-able entries: "stream" (window/hop), "thresholds", "provenance".
    """
    from safetensors.torch import save_file

    path = Path(path)
    config = model_config(model, fbank, **extra)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp, metadata={METADATA_KEY: json.dumps(config)})
    os.replace(tmp, path)
    return path


def read_config(path=None) -> dict:
    """The config in a checkpoint's header; `None` is the bundled default model."""
    from safetensors import safe_open

    if path is None and not DEFAULT_MODEL.is_file():
        raise CheckpointError(DEFAULT_MODEL, "no default model is bundled with this install; pass a checkpoint (--model PATH)")
    path = Path(path or DEFAULT_MODEL)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(path, f"not a safetensors file ({e})") from e
    if METADATA_KEY not in metadata:
        raise CheckpointError(path, "safetensors file without an edgetag config (convert it with train.convert)")
    config = json.loads(metadata[METADATA_KEY])
    if config.get("format") != FORMAT:
        raise CheckpointError(path, f"unsupported checkpoint format {config.get('format')!r} (expected {FORMAT})")
    return config


def build(config: dict) -> AudioTransformer:
    heads = {name: HeadConfig(h["kind"], h["labels"]) for name, h in config.get("heads", {}).items()}
    return AudioTransformer(EncoderConfig.from_dict(config["encoder"]), heads)


def load_model(path=None, device: str | torch.device = "cpu") -> AudioTransformer:
    """The model in eval mode (`None`: the bundled default model); `model.config` is the
    checkpoint's config dict and `model.fbank` the FbankConfig its inputs must be computed with."""
    from safetensors.torch import load_file

    config = read_config(path)
    path = path or DEFAULT_MODEL
    try:
        model = build(config)
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(path, f"weights do not fit the config ({str(e).splitlines()[0]})") from e
    model.config = config
    model.fbank = FbankConfig.from_dict(config["fbank"])
    return model.to(device).eval()
