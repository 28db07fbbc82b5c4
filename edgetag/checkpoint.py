"""One checkpoint format: a single .safetensors file, the weights, and the model's `ModelSpec`
as a JSON dict in its header. Loading never unpickles. Reading a spec needs no torch; the
weights become a torch model (`load_model`, `save`), so those import it when called.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from edgetag.spec import ModelSpec, SpecError

if TYPE_CHECKING:
    import torch

    from edgetag.model import AudioTransformer

METADATA_KEY = "edgetag"
DEFAULT_MODEL = Path(__file__).parent / "assets" / "model.safetensors"
DEFAULT_EXPORT = DEFAULT_MODEL.parent / "export"  # its ONNX export (deploy.export), for --backend onnx


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; `str()` is '<path>: <reason>'."""

    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: {reason}")


def save(path, model: AudioTransformer) -> Path:
    """Write the weights and `model.spec` atomically (a crash never leaves half a checkpoint)."""
    from safetensors.torch import save_file

    from edgetag.output import atomic

    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic(path) as tmp:
        save_file(state, tmp, metadata={METADATA_KEY: json.dumps(model.spec.to_dict())})
    return path


def _resolve(path) -> Path:
    if path is None and not DEFAULT_MODEL.is_file():
        raise CheckpointError(DEFAULT_MODEL, "no default model is bundled with this install; pass a checkpoint (--model PATH)")
    path = Path(path or DEFAULT_MODEL)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    return path


def read_spec(path=None) -> ModelSpec:
    """The spec in a checkpoint's header; `None` is the bundled default model."""
    from safetensors import safe_open

    path = _resolve(path)
    try:
        with safe_open(str(path), "np") as f:
            metadata = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(path, f"not a safetensors file ({e})") from e
    if METADATA_KEY not in metadata:
        raise CheckpointError(path, "safetensors file without an edgetag config (convert it with train.convert)")
    try:
        return ModelSpec.from_dict(json.loads(metadata[METADATA_KEY]))
    except (SpecError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"its config does not describe a model ({e})") from e


def digests(path) -> dict[str, str]:
    """sha256 of what each part of a checkpoint owns: "base" (its spec without the tasks, every
    tensor outside `tasks.`) and each task by name (its TaskConfig, its tensors). Adding a task
    changes no other entry."""
    import hashlib

    from safetensors import safe_open

    path = _resolve(path)
    spec = read_spec(path).to_dict()
    tasks = spec.pop("tasks", {})
    parts = {"base": hashlib.sha256(json.dumps(spec, sort_keys=True).encode())}
    for name, task in tasks.items():
        parts[name] = hashlib.sha256(json.dumps(task, sort_keys=True).encode())
    with safe_open(str(path), "np") as f:
        for key in sorted(f.keys()):
            owner = key.split(".")[1] if key.startswith("tasks.") else "base"
            tensor = f.get_tensor(key)
            parts[owner].update(f"{key} {tensor.dtype} {tensor.shape}".encode())
            parts[owner].update(tensor.tobytes())
    return {name: h.hexdigest() for name, h in parts.items()}


def load_model(path=None, device: str | torch.device = "cpu") -> AudioTransformer:
    """The model in eval mode (`None`: the bundled default model), its spec in `model.spec`."""
    from safetensors.torch import load_file

    from edgetag.model import AudioTransformer

    path = _resolve(path)
    model = AudioTransformer(read_spec(path))
    try:
        model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        # torch's message opens with "Error(s) in loading state_dict for ...:"; the first mismatch follows
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise CheckpointError(path, f"weights do not fit the config ({lines[1] if len(lines) > 1 else lines[0]})") from e
    return model.to(device).eval()
