"""edgetag: streaming on-device audio tagging and keyword spotting."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgetag")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def load_model(path=None, device="cpu"):
    """Load an edgetag checkpoint (.safetensors), by default the bundled model; see
    `edgetag.checkpoint.load_model`."""
    from edgetag.checkpoint import load_model as _load_model

    return _load_model(path, device)
