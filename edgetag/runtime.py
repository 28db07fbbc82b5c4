"""Inference backends behind one small interface: normalised fbank windows [B, T, n_mels] in,
per-head probabilities out (sigmoid for tag heads, softmax for keyword heads).

- `torch`: the checkpoint in eager PyTorch, fp32.
- `torch-int8`: torchao's dynamic int8 (`Int8DynamicActivationInt8WeightConfig`) on the linear
  layers, compiled with torch.compile, which is where its speed comes from on CPU (eager int8
  is slower than fp32).
- `onnx`: ONNX Runtime on an export from `deploy.export` (model.onnx fp32, model.int8.onnx).
- `tensorrt`: a serialized engine built on this device by `deploy.build_engine`.

Every backend also tells what it serves, from the checkpoint config (an export carries it in
manifest.json): `heads`, `fbank`, `window`/`hop` in seconds, calibrated `thresholds`, `model_id`,
and `fixed_window` when the input length is baked into the file.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from edgetag.checkpoint import DEFAULT_EXPORT, DEFAULT_MODEL, load_model
from edgetag.features import FbankConfig
from edgetag.model import HeadConfig

DEFAULT_WINDOW, DEFAULT_HOP = 1.0, 0.5  # seconds, for checkpoints without "stream" settings
BACKENDS = ("auto", "torch", "torch-int8", "onnx", "tensorrt")


def stream_settings(config: dict) -> tuple[float, float]:
    """(window, hop) in seconds from a checkpoint config, with the defaults when it has none."""
    stream = config.get("stream", {})
    return stream.get("window", DEFAULT_WINDOW), stream.get("hop", DEFAULT_HOP)


class BackendError(Exception):
    """A backend that cannot run here; `str()` says why and what to do."""


class Backend:
    name = ""
    fixed_window = False

    def describe(self, config: dict, source) -> None:
        self.config = config
        self.heads = {name: HeadConfig(h["kind"], h["labels"]) for name, h in config.get("heads", {}).items()}
        self.fbank = FbankConfig.from_dict(config["fbank"])
        self.window, self.hop = stream_settings(config)
        self.thresholds = config.get("thresholds", {})
        self.model_id = config.get("provenance", {}).get("id") or Path(str(source)).stem

    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        raise NotImplementedError


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, path=None, device: str = "cpu"):
        self.model = load_model(path, device)
        self.device = device
        self.describe(self.model.config, path or DEFAULT_MODEL)
        self.forward = self.model.probabilities

    @torch.inference_mode()
    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        return {name: p.float().cpu().numpy() for name, p in self.forward(windows.to(self.device)).items()}


class TorchInt8Backend(TorchBackend):
    name = "torch-int8"

    def __init__(self, path=None, compile: bool = True):
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
        except ImportError as e:
            raise BackendError("the torch-int8 backend needs torchao: pip install 'edgetag[deploy]'") from e
        super().__init__(path, "cpu")
        quantize_(self.model, Int8DynamicActivationInt8WeightConfig())
        # dynamic: one compiled graph serves a live hop (batch 1) and a file's batches alike
        self.forward = torch.compile(self.model.probabilities, dynamic=True) if compile else self.model.probabilities


class OnnxBackend(Backend):
    name = "onnx"
    fixed_window = True

    def __init__(self, path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise BackendError("the onnx backend needs onnxruntime: pip install 'edgetag[deploy]'") from e
        path = Path(path)
        if path.is_dir():
            path = path / ("model.int8.onnx" if (path / "model.int8.onnx").is_file() else "model.onnx")
        manifest = read_manifest(path.parent)
        self.describe(manifest["config"], manifest["model_id"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise BackendError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from e
        self.input = manifest["input"]["name"]
        self.outputs = manifest["outputs"]
        self.window_frames = manifest["window_frames"]

    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(self.outputs, {self.input: windows.float().numpy()})))


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise BackendError(f"{path}: missing; export the model with `python -m deploy.export`")
    return json.loads(path.read_text())


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

    def __init__(self, plan):
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
        self.describe(manifest["config"], manifest["model_id"])
        self.input, self.outputs = manifest["input"]["name"], manifest["outputs"]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise BackendError(f"{plan}: TensorRT could not deserialize the engine")
        self.context = self.engine.create_execution_context()

    def __call__(self, windows: torch.Tensor) -> dict[str, np.ndarray]:
        x = windows.float().contiguous().cuda()
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
        return {name: t.cpu().numpy() for name, t in outputs.items()}


def resolve(model, backend: str = "auto") -> str:
    """The backend `auto` means for this model file: an engine for .plan files, ONNX Runtime for
    exports (.onnx files and export folders), eager torch for checkpoints."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    path = Path(model) if model is not None else DEFAULT_MODEL
    if path.suffix == ".plan":
        return "tensorrt"
    if path.suffix == ".onnx" or (path.is_dir() and (path / "manifest.json").is_file()):
        return "onnx"
    return "torch"


def load_backend(model=None, backend: str = "auto", device: str = "cpu", threads: int = 0) -> Backend:
    """A backend for `model` (a checkpoint, an export folder or .onnx file, or a .plan engine;
    None: the bundled model, or its bundled export for `onnx`). `threads` sizes ONNX Runtime's pool (torch's is process-wide:
    torch.set_num_threads); 0 leaves the library's default."""
    kind = resolve(model, backend)
    if model is not None and not os.path.exists(model):
        raise BackendError(f"{model}: no such file or folder")
    if kind == "torch":
        return TorchBackend(model, device)
    if kind == "torch-int8":
        return TorchInt8Backend(model)
    if kind == "onnx":
        return OnnxBackend(model or DEFAULT_EXPORT, threads)
    if model is None:
        raise BackendError("the tensorrt backend needs an engine built on this device: python -m deploy.build_engine, then --model ENGINE.plan")
    return TensorRTBackend(model)
