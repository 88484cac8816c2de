"""MoQLinear: an ``nn.Linear`` whose weight is stored as group-wise int8 or packed int4.

State (what ``save_pretrained`` writes, named so that a checkpoint reads like the float one):

* ``weight``        int8 [out, in] (8 bits) or uint8 [out, ceil(in / 2)] (4 bits, two columns per byte),
                    a Parameter with ``requires_grad=False`` so that transformers' loading, device placement
                    and tied-weight bookkeeping treat it like any other weight;
* ``weight_scale``  fp16 [out, ceil(in / group_size)] buffer;
* ``weight_zero``   fp16 [out, ceil(in / group_size)] buffer, asymmetric quantization only;
* ``bias``          the float bias, unchanged.

The format is :mod:`hf_fastinfer.kernels.quant_format`; ``forward`` is the kernel library's
:func:`~hf_fastinfer.kernels.quant_matmul.quant_matmul` (Triton on GPU, the compiled CPU kernel on CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fastinfer.kernels.quant_format import QuantizedWeight, dequantize_weight, num_groups
from hf_fastinfer.kernels.quant_matmul import quant_matmul

from .search import SCALE_DTYPE, quantize_linear_weight

__all__ = ["MoQLinear"]


class MoQLinear(nn.Module):
    """Weight-only quantized linear layer (W8A16 / W4A16): ``y = x @ dequant(W).T + b`` in x's dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        bits: int,
        group_size: int,
        symmetric: bool,
        device=None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"MoQLinear: bits must be 8 or 4, got {bits!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.symmetric = symmetric
        self._allocate(bits, device)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        #: bits="auto" while loading: the other precision's quantization, kept until the bits are chosen
        self.alternative: QuantizedWeight | None = None

    def _allocate(self, bits: int, device) -> None:
        """(Re)create empty state tensors for ``bits`` (on the meta device while transformers builds the model)."""
        self.bits = bits
        packed = self.in_features if bits == 8 else -(-self.in_features // 2)
        groups = num_groups(self.in_features, self.group_size)
        qdtype = torch.int8 if bits == 8 else torch.uint8
        self.weight = nn.Parameter(torch.empty(self.out_features, packed, dtype=qdtype, device=device), requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(self.out_features, groups, dtype=SCALE_DTYPE, device=device))
        if self.symmetric:
            self.register_buffer("weight_zero", None)
        else:
            self.register_buffer("weight_zero", torch.empty(self.out_features, groups, dtype=SCALE_DTYPE, device=device))

    # -- construction -----------------------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int, symmetric: bool,
                    quantized: QuantizedWeight | None = None) -> "MoQLinear":
        """Quantize an existing float ``nn.Linear`` (round-to-nearest), or take its ``quantized`` weight made
        elsewhere (e.g. calibrated, quant/gptq.py); the bias is copied either way."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                     group_size=group_size, symmetric=symmetric, device=linear.weight.device,
                     dtype=linear.weight.dtype)
        if quantized is None:
            quantized = quantize_linear_weight(linear.weight, bits, group_size, symmetric)
        module.load_quantized(quantized)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def load_quantized(self, qw: QuantizedWeight) -> None:
        """Take the tensors of ``qw`` (any bits: the state is re-created when the precision changes)."""
        if qw.in_features != self.in_features or qw.out_features != self.out_features or qw.group_size != self.group_size:
            raise ValueError(
                f"MoQLinear({self.in_features} -> {self.out_features}, group {self.group_size}) cannot take a "
                f"quantized weight of {qw.in_features} -> {qw.out_features}, group {qw.group_size}"
            )
        if (qw.zeros is None) != self.symmetric:
            raise ValueError("MoQLinear: symmetric layers take no zero points, asymmetric ones need them")
        if qw.bits != self.bits:
            self._allocate(qw.bits, qw.qweight.device)
        self.weight = nn.Parameter(qw.qweight, requires_grad=False)
        self.weight_scale = qw.scales.to(SCALE_DTYPE)
        if qw.zeros is not None:
            self.weight_zero = qw.zeros.to(SCALE_DTYPE)

    # -- use ------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.weight, self.weight_scale, self.weight_zero, self.bias, bits=self.bits,
                            group_size=self.group_size, in_features=self.in_features)

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.weight, self.weight_scale, self.weight_zero, self.bits, self.group_size,
                               self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out, in] this layer computes with."""
        return dequantize_weight(self.quantized(), dtype)

    def to_linear(self, dtype: torch.dtype = torch.float32) -> nn.Linear:
        """A float ``nn.Linear`` holding the dequantized weight (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=self.weight.device,
                           dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def quantized_nbytes(self) -> int:
        return self.quantized().nbytes()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")
