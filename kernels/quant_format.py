"""Group-wise weight-only quantization formats (W8A16 / W4A16) and the functions that produce them.

A float weight ``w`` [N, K] (out_features, in_features) is cut along K into groups of ``group_size``
columns; group ``g`` of row ``n`` holds columns ``g*G .. min((g+1)*G, K) - 1``, so when G does not divide K the
last group is simply shorter (576 and 1536 with G = 128 work as they are, nothing is padded).

Each group has a float scale ``s`` and, for asymmetric quantization, a zero point ``z`` (a float offset in
quantized units, not rounded to an integer, so that the group's min and max land exactly on the ends of the
integer range): ``w ~= (q - z) * s`` with ``q`` a signed integer,

* int8: ``q`` in [-128, 127] stored as int8 [N, K]; symmetric uses [-127, 127] and z = 0;
* int4: ``q`` in [-8, 7] stored as the nibble ``q + 8``, two per byte along K (column 2j in the low nibble,
  2j+1 in the high nibble) as uint8 [N, ceil(K / 2)]; symmetric uses [-7, 7] and z = 0.

scales: [N, ceil(K / G)] float32 (or the model dtype); zeros: same shape, or None when symmetric.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "QuantizedWeight",
    "quantize_weight",
    "dequantize_weight",
    "pack_int4",
    "unpack_int4",
    "num_groups",
]


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def _check_group_size(group_size) -> None:
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values q [N, K] (int8 tensor with values in [-8, 7]) into uint8 [N, ceil(K/2)]."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise TypeError(f"pack_int4 takes a 2-D int8 tensor of values in [-8, 7], got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    n, k = q.shape
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    if k % 2:
        u = torch.cat([u, torch.full((n, 1), 8, dtype=torch.uint8, device=q.device)], dim=1)  # pad with q = 0
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [N, ceil(K/2)] -> int8 [N, K] with values in [-8, 7]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise TypeError(f"unpack_int4 takes a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != -(-in_features // 2):
        raise ValueError(f"packed has {packed.shape[1]} bytes per row; in_features={in_features} needs {-(-in_features // 2)}")
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :in_features].contiguous()


@dataclass
class QuantizedWeight:
    """A quantized weight in the format described in the module docstring."""

    qweight: torch.Tensor  # int8 [N, K] or uint8 [N, ceil(K/2)]
    scales: torch.Tensor  # [N, ceil(K/G)]
    zeros: torch.Tensor | None  # [N, ceil(K/G)] or None (symmetric)
    bits: int
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def nbytes(self) -> int:
        total = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    def int_values(self) -> torch.Tensor:
        """The signed integers q as int8 [N, K]."""
        return self.qweight if self.bits == 8 else unpack_int4(self.qweight, self.in_features)


def _expand_groups(t: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """[N, n_groups] -> [N, K]: each group's value repeated over its columns."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype = torch.float32,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of ``weight`` [N, K].

    ``scales`` / ``zeros`` ([N, n_groups]) may be given (e.g. from a search for better ones); otherwise
    symmetric uses absmax / qmax and asymmetric the group's min/max.
    """
    if bits not in (8, 4):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    _check_group_size(group_size)
    if weight.dim() != 2 or not weight.is_floating_point():
        raise TypeError(f"weight must be a 2-D float tensor, got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    ng = num_groups(k, group_size)
    w = weight.float()
    qmin, qmax = (-128, 127) if bits == 8 else (-8, 7)
    # Per-group statistics over a zero-padded [N, ng, G] view; the padding is masked out of min/max (and
    # adds only zeros to absmax).
    pad = ng * group_size - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, ng, group_size)
    valid = torch.nn.functional.pad(torch.ones(k, dtype=torch.bool, device=w.device), (0, pad)).view(1, ng, group_size)
    if scales is None:
        if symmetric:
            absmax = wg.abs().amax(dim=-1)
            scales = absmax / (qmax if bits == 8 else 7)
        else:
            wmax = wg.masked_fill(~valid, float("-inf")).amax(dim=-1)
            wmin = wg.masked_fill(~valid, float("inf")).amin(dim=-1)
            scales = (wmax - wmin) / (qmax - qmin)
    scales = scales.float()
    if not symmetric:
        # Degenerate groups (a single column, or values far from zero with a tiny spread) would need a zero
        # point beyond what fp16 holds exactly: keep |z| <= 128 + 1024 by flooring the scale at absmax / 1024.
        scales = torch.maximum(scales, wg.abs().amax(dim=-1) / 1024)
    # 1e-7 stays positive in fp16 (its smallest subnormal is 6e-8): an all-zero group gets q = 0, not 0 / 0
    scales = scales.clamp_min(1e-7).to(scale_dtype)
    s = scales.float()
    if symmetric:
        zeros = None
    elif zeros is None:
        # group min -> qmin exactly (and max -> qmax); the zero point is kept as a float, in the scale dtype
        wmin = wg.masked_fill(~valid, float("inf")).amin(dim=-1)
        zeros = qmin - wmin / s
    if zeros is not None:
        zeros = zeros.float().to(scale_dtype)
    z = 0.0 if zeros is None else _expand_groups(zeros.float(), group_size, k)
    lo = qmin if not symmetric else (-127 if bits == 8 else -7)
    q = torch.round(w / _expand_groups(s, group_size, k) + z).clamp(lo, qmax).to(torch.int8)
    qweight = q if bits == 8 else pack_int4(q)
    return QuantizedWeight(qweight.contiguous(), scales.contiguous(), None if zeros is None else zeros.contiguous(),
                           bits, group_size, k)


def dequantize_weight(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight [N, K] that the quantized weight stands for: (q - z) * s."""
    q = qw.int_values().float()
    s = _expand_groups(qw.scales.float(), qw.group_size, qw.in_features)
    if qw.zeros is not None:
        q = q - _expand_groups(qw.zeros.float(), qw.group_size, qw.in_features)
    return (q * s).to(dtype)
