"""``hf_fastinfer.report(model)``: what MoQ quantized, layer by layer, with bytes before and after."""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

from .moq_linear import MoQLinear

__all__ = ["QuantizationReport", "report"]


@dataclass
class LayerRow:
    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    bits: int | None  # None: left in floating point
    group_size: int | None
    float_bytes: int  # the weight in fp32
    bytes: int  # the weight as stored now (quantized tensors with scales, or the float weight)


@dataclass
class QuantizationReport:
    rows: list[LayerRow]
    #: tensor parallelism: the plan and the bytes each rank holds (text), None on one process
    parallel: str | None = None

    @property
    def float_bytes(self) -> int:
        return sum(r.float_bytes for r in self.rows)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def ratio(self) -> float:
        """Stored bytes of all Linear weights over their fp32 bytes."""
        return self.bytes / max(self.float_bytes, 1)

    @property
    def average_bits(self) -> float:
        """Average weight bits over the quantized layers (4 or 8 per weight; scales not counted)."""
        quantized = [r for r in self.rows if r.bits is not None]
        weights = sum(r.shape[0] * r.shape[1] for r in quantized)
        return sum(r.bits * r.shape[0] * r.shape[1] for r in quantized) / max(weights, 1)

    def summary(self) -> str:
        counts = {}
        for r in self.rows:
            key = "float" if r.bits is None else f"int{r.bits}"
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return (f"{len(self.rows)} Linear layers ({parts}); weights {_mib(self.float_bytes)} fp32 -> "
                f"{_mib(self.bytes)} ({self.ratio:.3f}x); {self.average_bits:.2f} average bits where quantized")

    def __str__(self) -> str:
        header = f"{'layer':<48} {'shape':>13} {'bits':>5} {'group':>5} {'fp32':>10} {'now':>10}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            lines.append(f"{r.name:<48} {f'{r.shape[0]}x{r.shape[1]}':>13} {r.bits or 'float':>5} "
                         f"{r.group_size or '-':>5} {_mib(r.float_bytes):>10} {_mib(r.bytes):>10}")
        lines.append("-" * len(header))
        lines.append(self.summary())
        if self.parallel:
            lines.append(self.parallel)
        return "\n".join(lines)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<tr><td style='text-align:left'>{html.escape(r.name)}</td><td>{r.shape[0]}&times;{r.shape[1]}</td>"
            f"<td>{r.bits or 'float'}</td><td>{r.group_size or '-'}</td><td>{_mib(r.float_bytes)}</td>"
            f"<td>{_mib(r.bytes)}</td></tr>"
            for r in self.rows
        )
        return (
            "<table><thead><tr><th>layer</th><th>shape</th><th>bits</th><th>group</th><th>fp32</th><th>now</th>"
            f"</tr></thead><tbody>{cells}</tbody></table><p>{html.escape(self.summary())}</p>"
            + (f"<pre>{html.escape(self.parallel)}</pre>" if self.parallel else "")
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def report(model: torch.nn.Module) -> QuantizationReport:
    """One row per Linear layer (quantized or not): bits, group size, fp32 bytes and bytes as stored; for a
    tensor-parallel model the rows are this rank's shards, followed by the plan and the bytes per rank."""
    from ..parallel import tensor_parallel_summary

    rows = []
    for name, module in model.named_modules():
        if isinstance(module, MoQLinear):
            rows.append(LayerRow(name, (module.out_features, module.in_features), module.bits, module.group_size,
                                 module.out_features * module.in_features * 4, module.quantized_nbytes()))
        elif isinstance(module, torch.nn.Linear):
            w = module.weight
            rows.append(LayerRow(name, tuple(w.shape), None, None, w.numel() * 4, w.numel() * w.element_size()))
    return QuantizationReport(rows, tensor_parallel_summary(model))
