"""Fused projections without a second copy of any weight.

q/k/v (and gate/up) of one block become one tensor each, ``torch.cat`` along the output features, and the
model's own modules are given views into it, so the block's original forward (prefill) and the fused decode
step read the same memory. Layout of a fused q/k/v weight: rows ``[0, Hq*D)`` are q's, then ``Hkv*D`` rows of k,
then ``Hkv*D`` of v (gate/up: I rows of gate, then I of up), for every tensor of the projection (a quantized
weight, its scales and zero points, the bias). Tensor parallelism splits each part by heads (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.decoder_layer import LayerProjection
from ..quant._pages import mapped_checkpoints, release_tensor_pages
from .detect import projection, projection_format

__all__ = ["fuse_projections", "unfuse_projections", "is_fused"]

_TENSORS = ("weight", "bias", "weight_scale", "weight_zero")


def _tensors(module) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name) for name in _TENSORS if isinstance(getattr(module, name, None), torch.Tensor)}


def _assign(module, name: str, tensor: torch.Tensor) -> None:
    current = getattr(module, name)
    if isinstance(current, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=current.requires_grad))
    else:  # a registered buffer (scales, zero points)
        setattr(module, name, tensor)


def _consecutive(pieces: list[torch.Tensor]) -> bool:
    """Whether the tensors already are consecutive row blocks of one contiguous tensor (a second inject)."""
    base = pieces[0].untyped_storage().data_ptr()
    if any(not p.is_contiguous() or p.untyped_storage().data_ptr() != base for p in pieces):
        return False
    return all(a.storage_offset() + a.numel() == b.storage_offset() for a, b in zip(pieces, pieces[1:]))


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    if _consecutive(pieces):
        first = pieces[0]
        return first.as_strided((sum(p.shape[0] for p in pieces), *first.shape[1:]), first.stride(),
                                first.storage_offset())
    return torch.cat(pieces, dim=0)


def is_fused(modules: list[nn.Module]) -> bool:
    """Whether the modules' weights already are consecutive views of one tensor."""
    return len(modules) > 1 and _consecutive([m.weight for m in modules])


@torch.no_grad()
def fuse_projections(modules: list[nn.Module]) -> LayerProjection | None:
    """One :class:`LayerProjection` over ``modules`` (concatenated output features), the modules re-pointed at
    views of it. None when they cannot share a tensor (different dtypes, bits, bias presence ...)."""
    if len(modules) == 1:
        return projection(modules[0])
    if len({projection_format(m) for m in modules}) != 1:
        return None
    parts = [_tensors(m) for m in modules]
    if len({tuple(p) for p in parts}) != 1:
        return None
    fused = {name: _joined([p[name] for p in parts]) for name in parts[0]}
    copied = not _consecutive([p["weight"] for p in parts])
    for name, whole in fused.items():
        start = 0
        for module, part in zip(modules, parts):
            rows = part[name].shape[0]
            _assign(module, name, whole[start : start + rows])  # a view; the old tensor is released
            start += rows
    if copied:
        # a checkpoint read in place (an fp32 safetensors file, memory-mapped): the copied tensors' pages go back,
        # so the fused tensor does not sit in memory beside them (the file is unchanged)
        checkpoints = mapped_checkpoints()
        for part in parts:
            for tensor in part.values():
                release_tensor_pages(tensor, checkpoints)
    first = projection(modules[0])
    return LayerProjection(fused["weight"], fused.get("bias"), first.bits, first.group_size, fused.get("weight_scale"),
                           fused.get("weight_zero"), first.in_features)


@torch.no_grad()
def unfuse_projections(modules: list[nn.Module]) -> None:
    """Give each module its own tensors again (copies of its views), so the fused tensor is freed."""
    if len(modules) < 2:
        return
    for module in modules:
        for name, tensor in _tensors(module).items():
            _assign(module, name, tensor.clone())
