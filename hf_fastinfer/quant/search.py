"""Group-wise weight quantization for MoQ: round-to-nearest with float zero points, and an optional range search.

What MoQ uses, and what was measured (default model, perplexity on pydoc_data.topics, fp32 14.47;
BENCHMARKS.md). Read these numbers knowing where the default model's weights come from: its GGUF stores every
transformer Linear as Q4_1 (groups of 32 with a float scale and a float minimum) and the embedding / tied
lm_head as Q8_0 (groups of 32, symmetric int8). Formats that can represent those grids exactly look
better on this model than they would on a checkpoint trained and saved in bf16.

* int4 is asymmetric with a *float* zero point: each group's min and max land exactly on the ends of the
  integer range. The usual integer zero point makes the grid overshoot the group's range by up to half a
  step at one end: +32.6% perplexity with it, +6.2% without (group 32, lm_head included). Part of that gap
  is the Q4_1 origin above: a float-zero int4 grid at group 32 reproduces those layers almost exactly
  (median SQNR 81 dB), so nearly all of the +6.2% comes from the lm_head. Symmetric int4 measures +43.8%.
* int8 is symmetric round-to-nearest, group 32 by default: +0.2%.
* ``search=True`` tries, per group, the ranges in ``SHRINK_GRID`` and keeps the one with the smallest squared
  weight error (optionally weighted per input column by ``importance``, e.g. mean squared activations). It is
  not the default: with plain squared error it measured *worse* (+7.2% at int4 against +6.2%), because it
  clips exactly the large weights that matter most (and moves the Q4_1 grid); weighted by activations it
  measured +3.8%, but that needs calibration data the streaming load does not have.
"""

from __future__ import annotations

import torch

from hf_fastinfer.kernels.quant_format import QuantizedWeight, dequantize_weight, num_groups, quantize_weight

from ._pages import release_free_heap

__all__ = ["quantize_linear_weight", "sqnr_db", "SHRINK_GRID", "SCALE_DTYPE"]

#: fractions of the round-to-nearest range tried per group by the int4 search (1.0 = plain rounding)
SHRINK_GRID = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0, 0.975, ..., 0.70
#: scales and zero points are stored in fp16: half the bytes of fp32, and well inside its range for weights
SCALE_DTYPE = torch.float16
#: rows handled at once: keeps each temporary under a few MiB. Larger blocks (2048 rows, 5-13 MiB temporaries)
#: made glibc move its mmap threshold up and keep the freed blocks in its heap: peak RSS while loading int4
#: grew by 490 MiB instead of 245 MiB in one environment (benchmarks/load_memory.py)
_ROW_CHUNK = 256
#: row blocks between two returns of the heap's free pages to the kernel (quant/_pages.py)
_TRIM_EVERY = 32


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
    # every candidate range at once: a leading grid dimension [S, 1, 1] (one pass of a few ops, not S passes)
    shrink = torch.tensor(SHRINK_GRID, dtype=torch.float32, device=w.device).view(-1, 1, 1)
    if symmetric:
        s = (top * shrink / qmax).clamp_min(1e-10).to(SCALE_DTYPE).float()  # [S, n, g]
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
    best = err.argmin(dim=0, keepdim=True)  # the first of equal errors: the widest range, as a strict < keeps
    best_s = s.gather(0, best)[0]
    best_z = None if z is None else z.gather(0, best)[0]
    return best_s, best_z


def quantize_linear_weight(
    weight: torch.Tensor, bits: int, group_size: int, symmetric: bool = True, search: bool = False,
    importance: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize a Linear weight [out_features, in_features] for :class:`~hf_fastinfer.quant.MoQLinear`.

    search: run the per-group range search (see the module docstring). Scales and zeros come back in fp16.
    """
    w = weight.detach()
    # Row blocks: the temporaries (float copies, grouped views) stay a few times _ROW_CHUNK rows, not a few
    # times the weight, which keeps peak memory low while a large model streams in. Each block's result is
    # written into the output tensors allocated after the first block (no list of parts and no concatenation:
    # that held the quantized weight twice), and every _TRIM_EVERY blocks the heap's free pages go back (a tied
    # output projection of 49,152 rows is 192 blocks; without it their freed temporaries piled up by up to 90
    # MiB in some runs, see quant/_pages.py).
    out = None
    for index, start in enumerate(range(0, w.shape[0], _ROW_CHUNK)):
        block = w[start : start + _ROW_CHUNK]
        if search:
            s, z = _search_chunk(block.float(), bits, group_size, symmetric, importance)
            part = quantize_weight(block, bits, group_size, symmetric, scale_dtype=SCALE_DTYPE, scales=s, zeros=z)
        else:
            part = quantize_weight(block, bits, group_size, symmetric, scale_dtype=SCALE_DTYPE)
        if start == 0 and block.shape[0] == w.shape[0]:
            return part
        if out is None:
            rows = w.shape[0]
            out = QuantizedWeight(
                part.qweight.new_empty((rows, *part.qweight.shape[1:])),
                part.scales.new_empty((rows, *part.scales.shape[1:])),
                None if part.zeros is None else part.zeros.new_empty((rows, *part.zeros.shape[1:])),
                bits, group_size, w.shape[1],
            )
        stop = start + block.shape[0]
        out.qweight[start:stop] = part.qweight
        out.scales[start:stop] = part.scales
        if part.zeros is not None:
            out.zeros[start:stop] = part.zeros
        if index % _TRIM_EVERY == _TRIM_EVERY - 1:
            release_free_heap()
    return out


def sqnr_db(weight: torch.Tensor, quantized: QuantizedWeight) -> float:
    """Signal-to-quantization-noise ratio of a quantized weight, in dB: 10 log10(|W|^2 / |W - deq(Q)|^2)."""
    w = weight.detach().float()
    err = (w - dequantize_weight(quantized, torch.float32)).pow(2).sum()
    return float(10 * torch.log10(w.pow(2).sum() / err.clamp_min(1e-30)))
