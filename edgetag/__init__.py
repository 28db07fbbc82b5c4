"""edgetag: streaming on-device audio tagging and keyword spotting."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgetag")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
