"""Export a checkpoint for deployment: ONNX (fp32, int8 Q/DQ for TensorRT, dynamic int8 for CPUs),
a manifest and reference outputs, and check the export against torch.

    python -m deploy.export --ckpt runs/student/best.safetensors --out export/ [--calibration ../shared/data/speech_commands]

Writes into --out:
- `model.onnx`: fp32, opset 20 (JetPack 6's TensorRT 10.3 parses <= 20), a fixed window, a
  dynamic batch, weights inside the file; input `fbank` [batch, frames, n_mels] (normalised),
  one output per head holding probabilities (sigmoid for tags, softmax for keywords);
- `model.int8.qdq.onnx`: explicit symmetric QuantizeLinear/DequantizeLinear pairs with zero
  points 0, calibrated on real clips: the input for a TensorRT INT8 engine;
- `model.int8.onnx`: dynamic int8 (weights int8, activations quantized at run time) for CPUs;
- `manifest.json`: the checkpoint's `ModelSpec` (fbank, heads, labels, thresholds, window and
  hop, provenance), opset, the input's name and shape, the outputs, sha256 of every file, and,
  once `train.calibrate --export` ran, each ONNX file's own thresholds
  (`edgetag.runtime.record_thresholds`);
- `reference.npz`: inputs and the torch model's outputs, for checking engines built elsewhere.

The export refuses itself (exit 2) when onnxruntime's fp32 output differs from torch by more
than 1e-4; it reports how closely the int8 models agree with fp32 on the calibration clips.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import typer

from edgetag import audio, checkpoint
from edgetag.features import fbank, normalize, windows
from edgetag.runtime import EXPORT_FORMAT, TorchBackend
from edgetag.spec import ModelSpec

OPSET = 20
INPUT = "fbank"
FP32_TOLERANCE = 1e-4
FILES = {"fp32": "model.onnx", "int8-qdq": "model.int8.qdq.onnx", "int8": "model.int8.onnx"}


class ExportError(Exception):
    pass


class Probabilities(torch.nn.Module):
    """The model with its heads' activations inside, outputs in head order, each task after the
    heads (ONNX has no dicts)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.heads = list(model.spec.outputs)

    def forward(self, fbank: torch.Tensor) -> tuple[torch.Tensor, ...]:
        probs = self.model.probabilities(fbank)
        return tuple(probs[name] for name in self.heads)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def export_onnx(model, frames: int, path: Path) -> None:
    from torch.export import Dim

    wrapped = Probabilities(model).eval()
    example = torch.zeros(2, frames, model.spec.encoder.n_mels)  # batch >= 2, or export fixes it to 1
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapped, (example,), str(path), input_names=[INPUT], output_names=wrapped.heads, opset_version=OPSET,
                          dynamic_shapes={INPUT: {0: Dim("batch", min=1, max=4096)}}, external_data=False, dynamo=True, verbose=False)
    check_onnx(path, frames, model.spec.encoder.n_mels)


def check_onnx(path: Path, frames: int, n_mels: int) -> None:
    """The checks a device without TensorRT can make: valid graph, opset, shapes, no
    custom-domain ops (TensorRT 10.3 would not parse them), symmetric Q/DQ."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset > OPSET:
        raise ExportError(f"{path}: opset {opset} > {OPSET}")
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    if dims[1:] != [frames, n_mels] or not isinstance(dims[0], str):
        raise ExportError(f"{path}: input shape {dims}, expected [batch, {frames}, {n_mels}] with a dynamic batch")
    custom = {n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")}
    if custom:
        raise ExportError(f"{path}: custom-domain ops {sorted(custom)}")
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 and node.input[2] in initializers:
            if np.any(numpy_helper.to_array(initializers[node.input[2]]) != 0):
                raise ExportError(f"{path}: {node.name} has a non-zero zero point (TensorRT needs symmetric Q/DQ)")


def calibration_windows(sources: list[str], spec: ModelSpec, limit: int) -> np.ndarray:
    """The model's input from real audio (files, folders): normalised windows as the engine cuts
    them, at most `limit`, spread over the clips."""
    files, _ = audio.expand(sources)
    rng = np.random.default_rng(0)
    files = [files[i] for i in rng.permutation(len(files))]
    out, n = [], 0
    for path in files:
        try:
            x = windows(fbank(audio.load(path, spec.fbank.sample_rate), spec.fbank), spec.window_frames, spec.hop_frames)
        except audio.AudioError:
            continue
        out.append(normalize(x[: max(1, limit // 50)], spec.fbank))
        n += len(out[-1])
        if n >= limit:
            break
    if not out:
        raise ExportError(f"no readable calibration audio in {', '.join(sources)}")
    return np.concatenate(out)[:limit].astype(np.float32)


def quantize_qdq(fp32: Path, calibration: np.ndarray, out: Path) -> None:
    """Static int8 with symmetric Q/DQ pairs (zero points 0), activation ranges from `calibration`:
    the input TensorRT builds INT8 engines from."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration[i : i + 16] for i in range(0, len(calibration), 16))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT: batch}

    prepared = out.with_suffix(".pre.onnx")  # shapes inferred and graph folded: what the quantizer expects
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    per_channel=True, op_types_to_quantize=["MatMul", "Gemm"],
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    prepared.unlink()


def quantize_dynamic_int8(fp32: Path, out: Path) -> None:
    """Dynamic int8 for CPUs: int8 weights per output channel, uint8 activations quantized at run
    time, integer matmuls.

    Weights get 7 bits (`reduce_range`, |q| <= 64). x86 CPUs without AVX-512 VNNI (AVX2 only:
    AMD Zen 2/3, most Intel client parts) multiply uint8 by int8 with VPMADDUBSW, which adds each
    pair of products into an int16 and saturates there: 2 x 255 x 127 overflows it, 2 x 255 x 64
    does not. With 8-bit weights the bundled model's tag probabilities moved by 0.061 on such a
    CPU against 0.014 on a VNNI one; with 7 bits every x86 kernel computes the same exact integer
    sums (tests/test_deploy.py holds both to a reference)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The dynamic quantizer re-infers shapes and trips over the exporter's value_info on the
    # heads; without it the graph quantizes cleanly.
    plain = onnx.load(str(fp32))
    del plain.graph.value_info[:]
    prepared = out.with_suffix(".pre.onnx")
    onnx.save(plain, str(prepared))
    quantize_dynamic(str(prepared), str(out), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True, op_types_to_quantize=["MatMul", "Gemm"])
    prepared.unlink()


def run_onnx(path: Path, x: np.ndarray, threads: int = 0) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT: x})


def agreement(reference: list[np.ndarray], got: list[np.ndarray], heads: list[str]) -> dict:
    """Max abs difference and top-1 agreement of each head against the reference."""
    return {h: {"max_abs": float(np.abs(r - g).max()), "top1": float((r.argmax(1) == g.argmax(1)).mean())} for h, r, g in zip(heads, reference, got)}


def export(ckpt, out: Path, calibration: list[str], calibration_windows_count: int = 256) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = checkpoint.load_model(ckpt)
    spec, heads = model.spec, list(model.spec.outputs)
    if not heads:
        raise ExportError(f"{ckpt}: the checkpoint has no heads (an encoder alone); fine-tune it first")
    backend = TorchBackend(model)
    torch_outputs = lambda x: list(backend.forward(x).values())  # noqa: E731  in head order

    export_onnx(model, spec.window_frames, out / FILES["fp32"])
    calib = calibration_windows(calibration, spec, calibration_windows_count)
    reference_inputs = np.concatenate([calib[:6], np.random.default_rng(0).standard_normal((2, spec.window_frames, spec.encoder.n_mels)).astype(np.float32)])
    expected = torch_outputs(reference_inputs)
    fp32 = agreement(expected, run_onnx(out / FILES["fp32"], reference_inputs), heads)
    worst = max(a["max_abs"] for a in fp32.values())
    if worst > FP32_TOLERANCE:
        raise ExportError(f"{out / FILES['fp32']}: onnxruntime differs from torch by {worst:.2e} (> {FP32_TOLERANCE:g})")
    np.savez(out / "reference.npz", **{INPUT: reference_inputs}, **{h: e for h, e in zip(heads, expected)})

    quantize_qdq(out / FILES["fp32"], calib, out / FILES["int8-qdq"])
    quantize_dynamic_int8(out / FILES["fp32"], out / FILES["int8"])
    check_onnx(out / FILES["int8-qdq"], spec.window_frames, spec.encoder.n_mels)
    calib_expected = torch_outputs(calib)
    report = {"fp32": fp32, **{kind: agreement(calib_expected, run_onnx(out / FILES[kind], calib), heads) for kind in ("int8-qdq", "int8")}}

    manifest = {
        "format": EXPORT_FORMAT,
        "spec": spec.to_dict(),
        "opset": OPSET,
        "input": {"name": INPUT, "shape": ["batch", spec.window_frames, spec.encoder.n_mels], "normalized": True},
        "outputs": heads,
        "files": {name: {"kind": kind, "sha256": sha256(out / name)} for kind, name in FILES.items()} | {"reference.npz": {"sha256": sha256(out / "reference.npz")}},
        "checks": report,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return report


def main(
    out: Path = typer.Option(..., help="Folder to write the export into."),
    ckpt: str = typer.Option(None, help="An edgetag checkpoint; default: the bundled model."),
    calibration: list[str] = typer.Option([], help="Audio files or folders for int8 calibration (default: the bundled example)."),
    windows_count: int = typer.Option(256, "--calibration-windows", help="Windows used for calibration."),
) -> None:
    sources = calibration or [str(Path(audio.__file__).parent / "assets" / "example.flac")]
    try:
        report = export(ckpt, out, sources, windows_count)
    except (ExportError, checkpoint.CheckpointError) as e:
        print(f"deploy.export: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    for kind, heads in report.items():
        figures = "; ".join(f"{h}: max |diff| {a['max_abs']:.2e}, top-1 agreement {100 * a['top1']:.1f}%" for h, a in heads.items())
        print(f"{kind:9s} vs {'torch' if kind == 'fp32' else 'fp32'}: {figures}")
    print(f"{out}: " + ", ".join(sorted(p.name for p in out.iterdir())))


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
