"""Group-wise weight quantization for MoQ: round-to-nearest, and a data-free scale/zero search for int4.

Why a search: round-to-nearest sets each group's range to its min/max (asymmetric) or absmax (symmetric),
so one outlier stretches the grid for the other 31 weights of a group. Shrinking the range clips the
outlier a little and gives every other weight a finer grid; which shrink is best differs per group. For
each group we try ``SHRINK_GRID`` and keep the (scale, zero) with the smallest squared weight error. It
needs no data and costs about a second per million int4 weights on two CPU cores. int8 keeps plain
rounding: its error is already about 16x smaller, and the search buys almost nothing there (measured in
BENCHMARKS.md).
"""

from __future__ import annotations

import torch

from hf_fastinfer.kernels.quant_format import QuantizedWeight, dequantize_weight, num_groups, quantize_weight

__all__ = ["quantize_linear_weight", "sqnr_db", "SHRINK_GRID", "SCALE_DTYPE"]

#: fractions of the round-to-nearest range tried per group by the int4 search (1.0 = plain rounding)
SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0, 0.975, ..., 0.70
#: scales and zero points are stored in fp16: half the bytes of fp32, and well inside its range for weights
SCALE_DTYPE = torch.float16
#: rows handled at once by the search: bounds its temporaries to a few times this many rows of the weight
_ROW_CHUNK = 2048


def _grouped(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> zero-padded [N, groups, G] view and the validity mask [1, groups, G]."""
    n, k = w.shape
    ng = num_groups(k, group_size)
    pad = ng * group_size - k
    wg = torch.nn.functional.pad(w, (0, pad)).view(n, ng, group_size)
    valid = torch.nn.functional.pad(torch.ones(k, dtype=torch.bool, device=w.device), (0, pad))
    return wg, valid.view(1, ng, group_size)


def _search_chunk(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, importance: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Best (scales, zeros) over SHRINK_GRID for one block of rows w [n, K] (float32)."""
    wg, valid = _grouped(w, group_size)  # [n, g, G]
    if importance is None:
        imp = valid.float()
    else:
        imp = torch.nn.functional.pad(importance.float(), (0, valid.numel() - importance.numel())).view(valid.shape)
    qmax = 7 if bits == 4 else 127
    qmin = -7 if (symmetric and bits == 4) else (-127 if symmetric else (-8 if bits == 4 else -128))
    if symmetric:
        top = wg.abs().amax(dim=-1)  # [n, g]
    else:
        top = wg.masked_fill(~valid, float("-inf")).amax(dim=-1)
        bottom = wg.masked_fill(~valid, float("inf")).amin(dim=-1)
    best_err = best_s = best_z = None
    for shrink in SHRINK_GRID:
        if symmetric:
            s = (top * shrink / qmax).clamp_min(1e-10).to(SCALE_DTYPE).float()
            z = None
            q = torch.round(wg / s[..., None]).clamp(qmin, qmax)
            err = (imp * (q * s[..., None] - wg) ** 2).sum(dim=-1)
        else:
            s = ((top - bottom) * shrink / (qmax - qmin)).clamp_min(1e-10).to(SCALE_DTYPE).float()
            # the shrunk range stays centred on the group's; z is stored (and used here) in the scale dtype
            mid = (top + bottom) / 2
            z = (qmin - (mid - (mid - bottom) * shrink) / s).to(SCALE_DTYPE).float()
            q = torch.round(wg / s[..., None] + z[..., None]).clamp(qmin, qmax)
            err = (imp * ((q - z[..., None]) * s[..., None] - wg) ** 2).sum(dim=-1)
        if best_err is None:
            best_err, best_s, best_z = err, s, z
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            if z is not None:
                best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_linear_weight(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, search: bool | None = None,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a Linear weight [out_features, in_features] for :class:`~hf_fastinfer.quant.MoQLinear`.

    search: run the per-group range search (default: for int4 only). Scales and zeros come back in fp16.
    """
    if search is None:
        search = bits == 4
    w = weight.detach()
    if not search:
        return quantize_weight(w, bits, group_size, symmetric, scale_dtype=SCALE_DTYPE)
    scales, zeros = [], []
    for start in range(0, w.shape[0], _ROW_CHUNK):
        s, z = _search_chunk(w[start : start + _ROW_CHUNK].float(), bits, group_size, symmetric, importance)
        scales.append(s)
        zeros.append(z)
    scales = torch.cat(scales)
    zeros = None if symmetric else torch.cat(zeros)
    return quantize_weight(w, bits, group_size, symmetric, scale_dtype=SCALE_DTYPE, scales=scales, zeros=zeros)


def sqnr_db(weight: torch.Tensor, quantized: QuantizedWeight) -> float:
    """Signal-to-quantization-noise ratio of a quantized weight, in dB: 10 log10(|W|^2 / |W - deq(Q)|^2)."""
    w = weight.detach().float()
    err = (w - dequantize_weight(quantized, torch.float32)).pow(2).sum()
    return float(10 * torch.log10(w.pow(2).sum() / err.clamp_min(1e-30)))
