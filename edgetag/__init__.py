"""edgetag: streaming on-device audio tagging and keyword spotting.

    import edgetag

    events = edgetag.tag_file("clip.wav")                   # the bundled model; or model="ckpt.safetensors"
    stream = edgetag.open_stream(model=None, keyword_on=0.8) # the same engine for live audio
    for block in blocks:                                     # float32 mono at 16 kHz, any block size
        for hop in stream.push(block):
            print(hop.start, hop.events)
    hops, closing = stream.flush()                           # the tail window, the tags still on
"""

import os
from importlib.metadata import PackageNotFoundError, version

# numpy's BLAS only multiplies the fbank's small mel matrices; its threads would contend with the
# inference threads (torch, ONNX Runtime) for the cores: a file on 2 threads ran at half the
# speed of 1 thread (measured). Effective when numpy is not imported yet; a user's setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

try:
    __version__ = version("edgetag")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def load_model(path=None, device="cpu"):
    """An edgetag checkpoint (.safetensors), by default the bundled model, as an eval-mode
    `AudioTransformer` whose `.spec` says how to feed it; see `edgetag.checkpoint.load_model`."""
    from edgetag.checkpoint import load_model as _load_model

    return _load_model(path, device)


def open_stream(model=None, backend: str = "auto", window: float | None = None, hop: float | None = None, threads: int = 0, gate=None, tasks=(), **post):
    """A streaming `Engine` for `model` (a checkpoint, an export folder or .onnx file, a TensorRT
    .plan; None: the bundled model): `push(samples)` audio at the model's sample rate in blocks of
    any size, get the hops it completed with their events; `flush()` at the end. `gate` (a
    `stream.GateConfig`) skips the encoder on windows near the noise floor. `tasks` picks the
    model's tasks to run ("base": its own heads; none: all). `post` are the
    `PostConfig` fields (tag_on, tag_off, keyword_on, speech_gate, smoothing, min_duration,
    refractory, fold, classes)."""
    from edgetag.runtime import load_backend
    from edgetag.stream import Engine, PostConfig

    return Engine(load_backend(model, backend, threads=threads, tasks=tasks), PostConfig(**post), window, hop, gate=gate)


def tag_file(path, model=None, backend: str = "auto", window: float | None = None, hop: float | None = None, **post) -> list:
    """The events (tags with onset and offset, keyword spots) of an audio file, as `edgetag file`
    prints them."""
    from edgetag.stream import process_file

    return process_file(open_stream(model, backend, window, hop, **post), path).events
