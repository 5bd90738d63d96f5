import importlib.metadata as _m
try:
    __version__ = _m.version("relinear")
except _m.PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
