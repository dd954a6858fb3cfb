"""The package's version, in one place: pyproject.toml reads it from here, and so do the CLI and the converter."""

__version__ = "0.1.0"
