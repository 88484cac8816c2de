"""The weights a decode step reads, moved into transparent huge pages (Linux).

A decoded token streams every weight of the model once: 270 MB for the default model in bf16, 67,000 pages of
4 KiB. Each page costs a TLB miss and a page walk (two-dimensional under a hypervisor), and the stream evicts
every other translation the process had, so the Python that runs between the compiled calls (the generate
loop, the embedding, the rotary module) starts each step on a cold TLB. In 2 MiB pages the same weights are
135 translations. Measured on the default model, bf16, 2 cores in a VM (A/B in one process, BENCHMARKS.md):
decode 52.8 -> 69.0 tokens/s, the same tokens; a plain ``sum()`` over 1 GiB reads 21 GB/s in 4 KiB pages and
29 GB/s in huge pages, which is why the bench measures the roofline both ways and uses the faster.

:func:`move_to_huge_pages` copies each storage the given tensors live in (all tensors of the model that share
it move with it, views keeping their offsets, through ``Tensor.set_``, so modules, fused specs and compiled
kernels see the new memory) into one arena allocated untouched and advised ``MADV_HUGEPAGE`` before its first
write, so the kernel backs it with huge pages as it is filled. A storage's old pages go back as soon as it is
copied (a memory-mapped checkpoint's pages are dropped; heap memory is freed), so the peak stays the model
plus one tensor. :func:`move_out_of_huge_pages` is the inverse (``uninject``). Nothing happens where the kernel
has transparent huge pages off (``never``), on other systems, or for GPU tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from ..quant._pages import _madvise, mapped_checkpoints, release_free_heap, release_tensor_pages

__all__ = ["thp_mode", "move_to_huge_pages", "move_out_of_huge_pages"]

_MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
#: storages below this stay where they are (norm weights, biases): a handful of small pages
MIN_BYTES = 1 << 16
#: below this much in all nothing moves: a few huge pages' worth of weights fits the TLB anyway, and the arena
#: would round a small model's memory up by up to a huge page
MIN_TOTAL = 16 * HUGE_PAGE


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page setting ("always", "madvise", "never"), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def _groups(tensors: Iterable[torch.Tensor], every: Iterable[torch.Tensor]) -> dict[int, list[torch.Tensor]]:
    """{storage address: every tensor living in it} for the storages of ``tensors`` (CPU, >= MIN_BYTES)."""
    wanted = {t.untyped_storage().data_ptr() for t in tensors
              if t.device.type == "cpu" and t.untyped_storage().nbytes() >= MIN_BYTES}
    groups: dict[int, dict[int, torch.Tensor]] = {}
    for t in every:
        ptr = t.untyped_storage().data_ptr() if t.device.type == "cpu" else None
        if ptr in wanted:
            groups.setdefault(ptr, {})[id(t)] = t
    return {ptr: list(ts.values()) for ptr, ts in groups.items()}


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


def _repoint(tensors: list[torch.Tensor], storage: torch.UntypedStorage, byte_offset: int) -> None:
    for t in tensors:
        size = t.element_size()
        t.set_(storage, byte_offset // size + t.storage_offset(), t.size(), t.stride())


@torch.no_grad()
def move_to_huge_pages(tensors: Iterable[torch.Tensor], every: Iterable[torch.Tensor]) -> tuple[int, int | None]:
    """Move the storages of ``tensors`` into one huge-page arena, with every tensor of ``every`` (the model's
    parameters, buffers and fused tensors) that shares one. Returns (bytes moved, the arena's address, which
    :func:`move_out_of_huge_pages` takes), or (0, None) when nothing was done."""
    if thp_mode() not in ("always", "madvise"):
        return 0, None
    groups = _groups(list(tensors), list(every))
    if sum(ts[0].untyped_storage().nbytes() for ts in groups.values()) < MIN_TOTAL:
        return 0, None
    sizes = {ptr: ts[0].untyped_storage().nbytes() for ptr, ts in groups.items()}
    spans = {ptr: -(-n // 64) * 64 for ptr, n in sizes.items()}  # cache-line aligned, as the allocator would
    arena = torch.empty(sum(spans.values()) + HUGE_PAGE, dtype=torch.uint8)  # large: fresh, untouched pages
    start = -(-arena.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    if _madvise()(start, sum(spans.values()) // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE) != 0:
        return 0, None
    storage = arena.untyped_storage()
    checkpoints = mapped_checkpoints()
    offset = start - arena.data_ptr()
    for ptr, ts in groups.items():
        old = _bytes_of(ts[0].untyped_storage())
        arena[offset : offset + sizes[ptr]].copy_(old)
        _repoint(ts, storage, offset)
        release_tensor_pages(old, checkpoints)  # a checkpoint read in place: its pages go back
        del old
        offset += spans[ptr]
    release_free_heap()
    return sum(sizes.values()), storage.data_ptr()


@torch.no_grad()
def move_out_of_huge_pages(every: Iterable[torch.Tensor], arena: int) -> None:
    """Give every tensor of ``every`` that lives in the arena at address ``arena`` ordinary memory again (one
    copy per storage it came from), so the arena is freed once nothing else refers to it."""
    arenas: dict[int, torch.Tensor] = {}
    for t in every:
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() == arena:
            arenas.setdefault(id(t), t)
    # tensors that shared one storage before the move are views of consecutive bytes: keep them together
    by_span: list[list[torch.Tensor]] = []
    for t in sorted(arenas.values(), key=lambda t: t.data_ptr()):
        end = t.data_ptr() + t.numel() * t.element_size()
        if by_span and t.data_ptr() < by_span[-1][0]:
            by_span[-1][0] = max(by_span[-1][0], end)
            by_span[-1][1].append(t)
        else:
            by_span.append([end, [t]])
    for end, ts in by_span:
        begin = min(t.data_ptr() for t in ts)
        fresh = torch.empty(end - begin, dtype=torch.uint8)
        source = ts[0].untyped_storage()
        fresh.copy_(_bytes_of(source)[begin - source.data_ptr() : end - source.data_ptr()])
        base = begin - source.data_ptr()
        for t in ts:
            size = t.element_size()
            t.set_(fresh.untyped_storage(), (t.storage_offset() * size - base) // size, t.size(), t.stride())

