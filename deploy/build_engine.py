"""Build a TensorRT engine on the device it will run on (a Jetson), and refuse it unless it
reproduces the export's reference outputs.

    python -m deploy.build_engine                                  # the bundled model, fp16 -> ./model.fp16.plan
    python -m deploy.build_engine --onnx export/model.onnx --precision fp16 --out export/model.fp16.plan
    python -m deploy.build_engine --onnx export/model.int8.qdq.onnx --precision int8 --out export/model.int8.plan

TensorRT 10.x Python API: builder, network, OnnxParser (its errors reported), a builder config
with a workspace limit, the FP16 flag where this TensorRT has it (TensorRT 11 drops it: precision
then comes from the ONNX), INT8 from the explicit Q/DQ nodes of `model.int8.qdq.onnx`, one
optimization profile over the batch axis, and a timing cache kept beside the engine and reused.
Beside `model.plan` goes `model.json`: TensorRT version, GPU, compute capability, L4T release,
precision, the ONNX's hash. The engine then runs on `reference.npz`; one that disagrees beyond
tolerance (fused-attention bugs are known in TensorRT 10.3 and 10.7) is deleted and the build
fails. Engines are never copied between machines: copy the export folder and build here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import typer

from edgetag.checkpoint import DEFAULT_EXPORT
from edgetag.runtime import BackendError, TensorRTBackend, device_description, import_tensorrt, read_manifest

PRECISIONS = ("fp32", "fp16", "int8")
# max |difference| of probabilities against the fp32 torch reference, and top-1 agreement
TOLERANCE = {"fp32": (1e-3, 1.0), "fp16": (2e-2, 0.95), "int8": (8e-2, 0.85)}


class BuildError(Exception):
    pass


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    return any(n.op_type == "QuantizeLinear" for n in onnx.load(str(onnx_path), load_external_data=False).graph.node)


def verify(expected: dict[str, np.ndarray], got: dict[str, np.ndarray], precision: str) -> list[str]:
    """The heads on which an engine disagrees with the reference beyond tolerance."""
    max_abs, top1 = TOLERANCE[precision]
    problems = []
    for head, reference in expected.items():
        diff = float(np.abs(got[head] - reference).max())
        agree = float((got[head].argmax(1) == reference.argmax(1)).mean())
        if diff > max_abs or agree < top1:
            problems.append(f"{head}: max |diff| {diff:.3g} (allowed {max_abs:g}), top-1 agreement {agree:.2f} (needed {top1:g})")
    return problems


def build(onnx_path: Path, precision: str, out: Path, workspace_mib: int = 1024, max_batch: int = 64, opt_batch: int = 1,
          timing_cache: Path | None = None, trt=None) -> dict:
    """Build, serialize and describe an engine; returns the sidecar (not yet self-tested)."""
    if precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: no such ONNX file")
    if precision == "int8" and not has_qdq(onnx_path):
        raise BuildError(f"{onnx_path}: INT8 needs the explicit Q/DQ export (model.int8.qdq.onnx); implicit calibration is deprecated in TensorRT 10")
    manifest = read_manifest(onnx_path.parent)
    trt = trt or import_tensorrt()
    here = device_description(trt)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    if precision in ("fp16", "int8"):
        if hasattr(trt.BuilderFlag, "FP16"):  # gone in TensorRT 11, where the ONNX's types decide
            config.set_flag(trt.BuilderFlag.FP16)
        elif precision == "fp16":
            raise BuildError(f"TensorRT {trt.__version__} has no FP16 builder flag; export an FP16 ONNX and build it as fp32 (strongly typed)")
    if precision == "int8" and hasattr(trt.BuilderFlag, "INT8"):
        config.set_flag(trt.BuilderFlag.INT8)  # the scales come from the Q/DQ nodes

    name, shape = manifest["input"]["name"], manifest["input"]["shape"][1:]  # [frames, n_mels]: the spec's window, checked
    profile = builder.create_optimization_profile()
    profile.set_shape(name, (1, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)

    timing_cache = Path(timing_cache or out.parent / "timing.cache")
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{onnx_path}: TensorRT could not build an engine (see its log above)")
    out.write_bytes(bytes(plan))
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    sidecar = {**here, "precision": precision, "onnx": onnx_path.name, "onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
               "model_id": manifest["spec"].model_id or onnx_path.parent.name, "export_dir": str(onnx_path.parent.resolve()), "max_batch": max_batch,
               "build_seconds": round(time.perf_counter() - start, 1)}
    out.with_suffix(".json").write_text(json.dumps(sidecar, indent=1))
    return sidecar


def self_test(plan: Path, precision: str) -> list[str]:
    """Run the engine on the export's reference.npz; the problems found (none: it passed)."""
    backend = TensorRTBackend(plan)
    reference = np.load(backend.export_dir / "reference.npz")
    got = backend.forward(reference[backend.input])  # reference inputs are normalised already
    return verify({head: reference[head] for head in backend.outputs}, got, precision)


def default_onnx(precision: str) -> Path:
    """The bundled export's input for this precision (INT8 comes from the Q/DQ model)."""
    return DEFAULT_EXPORT / ("model.int8.qdq.onnx" if precision == "int8" else "model.onnx")


def main(
    onnx_file: Path = typer.Option(None, "--onnx", help="model.onnx (fp32/fp16) or model.int8.qdq.onnx (int8) from deploy.export; default: the bundled model's."),
    precision: str = typer.Option("fp16", help="fp32, fp16 or int8."),
    out: Path = typer.Option(None, help="The engine to write (.plan); its sidecar .json goes beside it. Default: model.PRECISION.plan here."),
    workspace_mib: int = typer.Option(1024, help="Builder workspace limit."),
    max_batch: int = typer.Option(64, help="Largest batch the engine accepts (file mode batches windows)."),
    timing_cache: Path = typer.Option(None, help="Timing cache to reuse and update (default: timing.cache beside --out)."),
) -> None:
    onnx_file = onnx_file or default_onnx(precision)
    out = out or Path(f"model.{precision}.plan")
    try:
        sidecar = build(onnx_file, precision, out, workspace_mib, max_batch, timing_cache=timing_cache)
        problems = self_test(out, precision)
    except (BuildError, BackendError) as e:
        print(f"deploy.build_engine: error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    if problems:
        out.unlink(missing_ok=True)
        out.with_suffix(".json").unlink(missing_ok=True)
        print(f"deploy.build_engine: error: {out}: refused, it disagrees with reference.npz: {'; '.join(problems)}", file=sys.stderr)
        raise typer.Exit(2)
    print(f"{out}: {precision} engine for {sidecar['gpu']} (TensorRT {sidecar['tensorrt']}), built in {sidecar['build_seconds']} s, matches reference.npz")


if __name__ == "__main__":
    from edgetag.cli import run_guarded

    run_guarded(lambda: typer.run(main), __spec__.name)
