"""imgcls: config-only, reproducible image classification."""

__version__ = "0.1.0"
