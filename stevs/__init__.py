"""stevs: predict spatial gene expression from H&E whole-slide images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("stevs")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
