"""The version of masktune."""

__version__ = "0.1.0"
