"""The package version (one place: the package, file headers and the build read it)."""

__version__ = "0.1.0"
