"""Deployment of fitted flowsk estimators: ONNX export and parity checks with onnxruntime."""
from .onnx import (
    FORBIDDEN_OPS,
    OnnxPart,
    available_parts,
    check_onnx,
    op_types,
    read_metadata,
    register_parts,
    to_onnx,
)

__all__ = ["FORBIDDEN_OPS", "OnnxPart", "available_parts", "check_onnx", "op_types",
           "read_metadata", "register_parts", "to_onnx"]
