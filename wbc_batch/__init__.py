"""wbc-batch: classify white blood cells in microscope images with ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"
