"""fisherfast: Fisher geometry of language-model activations at vocabulary scale."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fisherfast")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+local"

from fisherfast import ops  # noqa: E402
from fisherfast.ops import available_backends  # noqa: E402

__all__ = ["ops", "available_backends", "__version__"]
