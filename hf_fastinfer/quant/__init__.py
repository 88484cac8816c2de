"""MoQ weight quantization: MoQLinear, group-wise quantization, mixed-precision bit assignment, report."""

from .moq_linear import MoQLinear
from .report import QuantizationReport, report
from .search import quantize_linear_weight, sqnr_db

__all__ = ["MoQLinear", "QuantizationReport", "report", "quantize_linear_weight", "sqnr_db"]
