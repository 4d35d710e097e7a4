"""Exporters: turn a trained student into a deployable file (ONNX today)."""
from exporters.onnx_export import (INPUT_NAME, OUTPUT_NAME, NHWCInput, OnnxExportResult, export_student_onnx,
                          fold_conv_bn)

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "NHWCInput", "OnnxExportResult", "export_student_onnx",
           "fold_conv_bn"]
