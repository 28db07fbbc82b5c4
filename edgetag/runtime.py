"""Inference backends behind one small interface: log-mel windows [B, window_frames, n_mels] in,
per-head probabilities out (sigmoid for tag heads, softmax for keyword heads), numpy both ways.

Every backend carries the `ModelSpec` of what it serves (`backend.spec`: heads, fbank, window and
hop, thresholds, provenance) and normalises its input itself, so no caller can forget to;
`forward()` takes windows already normalised, as the exported files and reference.npz store them.
A model with tasks serves the ones it is loaded with (`tasks`; `spec.select`) as its heads.

- `onnx`: ONNX Runtime on an export from `deploy.export` (model.onnx fp32, model.int8.onnx): the
  default for the bundled model, and the one backend that needs no torch.
- `torch`: the checkpoint in eager PyTorch, fp32.
- `torch-int8`: torchao's dynamic int8 (`Int8DynamicActivationInt8WeightConfig`) on the linear
  layers, compiled with torch.compile, which is where its speed comes from on CPU (eager int8
  is slower than fp32).
- `tensorrt`: a serialized engine built on this device by `deploy.build_engine`.
"""

from __future__ import annotations

import json
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgetag.checkpoint import DEFAULT_EXPORT, DEFAULT_MODEL, load_model
from edgetag.features import normalize, windows
from edgetag.spec import ModelSpec, SpecError

if TYPE_CHECKING:
    from edgetag.model import AudioTransformer

BACKENDS = ("auto", "torch", "torch-int8", "onnx", "tensorrt")
EXPORT_FORMAT = "edgetag-export/2"
EXPORT_FORMAT_1 = "edgetag-export/1"  # the spec under "config" in format 1, the window also under "window_frames"


class BackendError(Exception):
    """A backend that cannot run here; `str()` says why and what to do."""


class Backend:
    name = ""
    fixed_window = False  # the input length is baked into the file (ONNX, TensorRT)

    def __init__(self, spec: ModelSpec, source, tasks: tuple[str, ...] = ()):
        """`spec` is the model's whole spec; the backend serves the `tasks` of it it is asked
        for (`ModelSpec.select`; none: all) as its `spec`'s heads."""
        self.source = source
        try:
            self.spec = spec.select(tasks)
        except SpecError as e:
            raise BackendError(f"{source}: {e}") from e
        self.tasks = {name: spec.tasks[name] for name in self.spec.heads if name in spec.tasks}  # the heads that are tasks, and their configs
        self.model_id = spec.model_id or Path(str(source)).stem

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """One batch of normalised windows (float32) -> per-head probabilities."""
        raise NotImplementedError

    def __call__(self, windows: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Log-mel windows [n, frames, n_mels], any n: normalised, run `batch_size` at a time."""
        out: dict[str, list[np.ndarray]] = {}
        for i in range(0, len(windows), batch_size):
            for name, p in self.forward(normalize(windows[i : i + batch_size], self.spec.fbank)).items():
                out.setdefault(name, []).append(p)
        return {name: np.concatenate(ps) for name, ps in out.items()}


def clip_probabilities(backend: Backend, clips: list, batch_size: int = 256) -> list[dict[str, np.ndarray]]:
    """Per clip, per head: the probabilities [windows, classes] of the windows the streaming engine
    runs over it (every hop from its start, the tail padded with silence), batched across clips."""
    per_clip = [windows(f, backend.spec.window_frames, backend.spec.hop_frames) for f in clips]
    probs = backend(np.concatenate(per_clip), batch_size) if per_clip else {}
    bounds = np.cumsum([0] + [len(w) for w in per_clip])
    return [{name: p[a:b] for name, p in probs.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendError("the torch backends need torch: pip install 'edgetag[torch]' (or use the onnx backend)") from e
    return torch


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, model: AudioTransformer, source="model", tasks: tuple[str, ...] = ()):
        from edgetag.model import for_inference

        super().__init__(model.spec, source, tasks)
        self.model = model
        self.device = next(model.parameters()).device
        # the weights as they are now (a mobilenet's are folded into a copy): make a backend after training, not before
        self.runner = for_inference(model)
        self.probabilities = partial(self.runner.probabilities, outputs=tuple(self.spec.heads))

    @classmethod
    def load(cls, path=None, device: str = "cpu", tasks: tuple[str, ...] = ()) -> TorchBackend:
        import_torch()
        return cls(load_model(path, device), path or DEFAULT_MODEL, tasks)

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            return {name: p.float().cpu().numpy() for name, p in self.probabilities(torch.from_numpy(x).to(self.device)).items()}


class TorchInt8Backend(TorchBackend):
    name = "torch-int8"

    def __init__(self, model: AudioTransformer, source="model", compile: bool = True, tasks: tuple[str, ...] = ()):
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError as e:
            raise BackendError("the torch-int8 backend needs torchao: pip install 'edgetag[deploy]'") from e
        super().__init__(model.cpu(), source, tasks)
        quantize_(self.runner, Int8DynamicActivationInt8WeightConfig())
        # dynamic: one compiled graph serves a live hop (batch 1) and a file's batches alike
        torch = import_torch()
        self.probabilities = partial(torch.compile(self.runner.probabilities, dynamic=True) if compile else self.runner.probabilities, outputs=tuple(self.spec.heads))

    @classmethod
    def load(cls, path=None, compile: bool = True, tasks: tuple[str, ...] = ()) -> TorchInt8Backend:
        import_torch()
        return cls(load_model(path), path or DEFAULT_MODEL, compile, tasks)


class OnnxBackend(Backend):
    name = "onnx"
    fixed_window = True

    def __init__(self, path, threads: int = 0, tasks: tuple[str, ...] = ()):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("the onnx backend needs onnxruntime (an edgetag dependency): pip install onnxruntime") from e
        path = Path(path)
        if path.is_dir():
            path = path / ("model.int8.onnx" if (path / "model.int8.onnx").is_file() else "model.onnx")
        manifest = read_manifest(path.parent)
        model = verified_bytes(path, manifest)
        spec, entry = manifest["spec"], manifest["files"][path.name]
        if "thresholds" in entry:  # calibrated through this very file (train.calibrate --export)
            try:
                spec = spec.with_thresholds(entry["thresholds"], entry.get("calibration", {}))
            except SpecError as e:
                raise BackendError(f"{path}: its thresholds in manifest.json do not fit the model ({e})") from e
        super().__init__(spec, path.parent, tasks)  # the file answers with every head and task; the chosen ones are read out
        # Dynamic int8 scales activations by the whole input tensor, so a window's numbers would
        # depend on the other windows of its batch: it runs one window per call, and a file's
        # windows go to `threads` calls at once instead of splitting each small call over threads.
        self.per_window = entry.get("kind") == "int8"
        self.pool = ThreadPoolExecutor(threads) if self.per_window and threads > 1 else None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = 1 if self.pool else threads
        try:
            self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
        self.path = path
        self.input, self.outputs = manifest["input"]["name"], [name for name in manifest["outputs"] if name in self.spec.heads]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.outputs, {self.input: x})

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        if not self.per_window:
            return dict(zip(self.outputs, self._run(x)))
        one = [x[i : i + 1] for i in range(len(x))]
        results = list(self.pool.map(self._run, one) if self.pool else map(self._run, one))
        return {name: np.concatenate([r[k] for r in results]) for k, name in enumerate(self.outputs)}


def read_manifest(folder: Path) -> dict:
    """An export's manifest.json, its spec under "spec" as a `ModelSpec`, checked against the
    input length the ONNX files were exported with."""
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise BackendError(f"{path}: missing; export the model with `python -m deploy.export`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BackendError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format") if isinstance(manifest, dict) else None
    if version not in (EXPORT_FORMAT, EXPORT_FORMAT_1):
        raise BackendError(f"{path}: unsupported export format {version!r} (this edgetag reads {EXPORT_FORMAT} and {EXPORT_FORMAT_1})")
    try:
        spec = ModelSpec.from_dict(manifest["spec"] if version == EXPORT_FORMAT else manifest["config"])
    except KeyError as e:
        raise BackendError(f"{path}: its spec does not describe a model (missing {e})") from e
    except SpecError as e:
        raise BackendError(f"{path}: its spec does not describe a model ({e})") from e
    try:  # what the backends read besides the spec
        frames, _ = manifest["input"]["shape"][1], manifest["input"]["name"]
        if not isinstance(manifest["outputs"], list) or not isinstance(manifest["files"], dict):
            raise TypeError("outputs must be a list, files an object")
    except (KeyError, TypeError, IndexError) as e:
        raise BackendError(f"{path}: not an edgetag export manifest ({'missing ' if isinstance(e, KeyError) else ''}{e})") from e
    if frames != spec.window_frames:
        raise BackendError(f"{path}: the ONNX input holds {frames} frames, its spec's window {spec.window_frames}; export it again")
    return {**manifest, "spec": spec}


def record_thresholds(folder: Path, name: str, thresholds: dict, calibration: dict) -> None:
    """Give one file of an export its own calibrated thresholds (and what they were measured
    on) in manifest.json: the ONNX backend runs that file with them instead of the spec's."""
    from edgetag.output import atomic

    path = Path(folder) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][name] |= {"thresholds": thresholds, "calibration": calibration}
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def verified_bytes(path: Path, manifest: dict) -> bytes:
    """The file's bytes, once they hash to what the export's manifest lists for it: a flipped
    byte, or another model copied under its name, would otherwise run under the manifest's
    model id and thresholds."""
    import hashlib

    data = Path(path).read_bytes()
    entry = manifest.get("files", {}).get(Path(path).name)
    if entry is None:
        raise BackendError(f"{path}: not listed in its folder's manifest.json; export the model again")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BackendError(f"{path}: its sha256 differs from manifest.json's (changed or damaged since export); export the model again")
    return data


# ---------------------------------------------------------------------------------------------
# TensorRT


def l4t_release(path: str = "/etc/nv_tegra_release") -> str | None:
    """The Jetson Linux release ("36.4.3") from "# R36 (release), REVISION: 4.3, GCID: ..."."""
    try:
        line = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    parts = dict(p.strip().split(":", 1) if ":" in p else (p.strip(), "") for p in line.lstrip("# ").split(","))
    major = line.lstrip("# ").split(" ")[0].lstrip("R")
    return f"{major}.{parts.get('REVISION', '').strip()}".rstrip(".")


def device_description(trt) -> dict:
    """What an engine is bound to: the TensorRT version and the GPU (and the L4T release)."""
    torch = import_torch()  # its CUDA runtime holds the engine's buffers
    if not torch.cuda.is_available():
        raise BackendError("TensorRT needs an NVIDIA GPU, and torch sees none here")
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
            "l4t": l4t_release(), "machine": platform.machine()}


def mismatch(sidecar: dict, here: dict) -> list[str]:
    """The ways an engine's build device differs from this one (an engine runs only where it was built)."""
    return [f"{key}: engine {sidecar.get(key)!r}, here {here[key]!r}" for key in ("tensorrt", "gpu", "compute_capability", "l4t") if sidecar.get(key) != here[key]]


def import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise BackendError(f"TensorRT is not available ({e}); on a Jetson it comes with JetPack (apt install python3-libnvinfer)") from e
    return tensorrt


class TensorRTBackend(Backend):
    name = "tensorrt"
    fixed_window = True

    def __init__(self, plan, tasks: tuple[str, ...] = ()):
        trt = import_tensorrt()
        plan = Path(plan)
        sidecar_path = plan.with_suffix(".json")
        if not sidecar_path.is_file():
            raise BackendError(f"{sidecar_path}: missing; build engines with `python -m deploy.build_engine`")
        sidecar = json.loads(sidecar_path.read_text())
        problems = mismatch(sidecar, device_description(trt))
        if problems:
            raise BackendError(f"{plan}: built for another device or TensorRT ({'; '.join(problems)}); rebuild it here")
        self.export_dir = Path(sidecar.get("export_dir", plan.parent))
        manifest = read_manifest(self.export_dir)
        super().__init__(manifest["spec"], self.export_dir, tasks)
        self.input, self.outputs = manifest["input"]["name"], manifest["outputs"]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()

    def forward(self, x: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(x, np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(x.shape))
        self.context.set_tensor_address(self.input, x.data_ptr())
        outputs = {}
        for name in self.outputs:
            outputs[name] = torch.empty(tuple(self.context.get_tensor_shape(name)), dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise BackendError("TensorRT execution failed")
        stream.synchronize()
        return {name: t.cpu().numpy() for name, t in outputs.items() if name in self.spec.heads}


def resolve(model, backend: str = "auto") -> str:
    """The backend `auto` means for this model file: an engine for .plan files, ONNX Runtime for
    exports (.onnx files and export folders) and for the bundled model (its export), eager
    torch for checkpoints."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    path = Path(model) if model is not None else DEFAULT_EXPORT
    if path.suffix == ".plan":
        return "tensorrt"
    if path.suffix == ".onnx" or (path.is_dir() and (path / "manifest.json").is_file()):
        return "onnx"
    return "torch"


def load_backend(model=None, backend: str = "auto", device: str = "cpu", threads: int = 0, tasks: tuple[str, ...] = ()) -> Backend:
    """A backend for `model` (a checkpoint, an export folder or .onnx file, or a .plan engine;
    None: the bundled model: its export for `onnx`, its checkpoint for the torch backends).
    `threads` sizes ONNX Runtime's pool, or torch's, which is process-wide (set once per process:
    torch.set_num_threads); 0 leaves the library's default. `tasks` names the model's tasks to
    run (spec.BASE: its own heads; none: all of them)."""
    kind = resolve(model, backend)
    if model is not None and not os.path.exists(model):
        raise BackendError(f"{model}: no such file or folder")
    if kind.startswith("torch") and threads:
        import_torch().set_num_threads(threads)
    tasks = tuple(tasks)
    if kind == "torch":
        return TorchBackend.load(model, device, tasks)
    if kind == "torch-int8":
        return TorchInt8Backend.load(model, tasks=tasks)
    if kind == "onnx":
        return OnnxBackend(model or DEFAULT_EXPORT, threads, tasks)
    if model is None:
        raise BackendError("the tensorrt backend needs an engine built on this device: python -m deploy.build_engine, then --model ENGINE.plan")
    return TensorRTBackend(model, tasks)
