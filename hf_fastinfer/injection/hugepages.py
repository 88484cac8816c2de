"""The weights a decode step reads, moved into transparent huge pages (Linux).

A decoded token streams every weight of the model once: 270 MB for the default model in bf16, 67,000 pages of
4 KiB. Each page costs a TLB miss and a page walk (two-dimensional under a hypervisor), and the stream evicts
every other translation the process had, so the Python that runs between the compiled calls (the generate
loop, the embedding, the rotary module) starts each step on a cold TLB. In 2 MiB pages the same weights are
135 translations. Measured on the default model, bf16, 2 cores in a VM (A/B in one process, BENCHMARKS.md):
decode 1.14-1.25x (three runs), the same tokens; a plain ``sum()`` over 1 GiB reads 21 GB/s in 4 KiB pages and
29 GB/s in huge pages, which is why the bench measures the roofline both ways and uses the faster.

:func:`move_to_huge_pages` copies the bytes of the given tensors (each with the tensors of the model that
overlap it: a fused tensor and its views move together and keep their offsets, through ``Tensor.set_``, so
modules, fused specs and compiled kernels see the new memory) into one arena allocated untouched and advised
``MADV_HUGEPAGE`` before its first write, so the kernel backs it with huge pages as it is filled; the heap's
freed pages go back every few MiB, so the peak stays near the model plus one tensor. A checkpoint read in place
(a memory-mapped fp32 safetensors file) is left where it is. :func:`move_out_of_huge_pages` is the inverse
(``uninject``). Nothing happens where the kernel has transparent huge pages off (``never``), on other
systems, for GPU tensors, or below MIN_TOTAL bytes in all.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch

from ..quant._pages import _file_mappings, _madvise, mapped_checkpoints, release_free_heap

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


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last) byte addresses ``t`` can touch."""
    size = t.element_size()
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) if t.numel() else 0
    return t.data_ptr(), t.data_ptr() + extent * size


def _units(tensors: list[torch.Tensor], every: list[torch.Tensor]) -> list[tuple[int, int, list[torch.Tensor]]]:
    """The byte ranges to move: within each storage that holds one of ``tensors`` (CPU, >= MIN_BYTES), the
    connected runs of overlapping tensors of ``every`` that contain one of ``tensors``, with their tensors. A
    fused tensor and its views are one run; a memory-mapped checkpoint (one storage for the whole file) gives
    one run per weight, so tensors nobody streams (an untied input embedding) stay where they are."""
    hot = {id(t) for t in tensors if t.device.type == "cpu" and t.numel() * t.element_size() >= MIN_BYTES}
    by_storage: dict[int, dict[int, torch.Tensor]] = {}
    wanted = {t.untyped_storage().data_ptr() for t in tensors if id(t) in hot}
    for t in list(tensors) + list(every):
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() in wanted:
            by_storage.setdefault(t.untyped_storage().data_ptr(), {})[id(t)] = t
    units = []
    for ts in by_storage.values():
        units += [(first, last, members) for first, last, members in _runs(ts.values())
                  if any(id(t) in hot for t in members)]
    return units


def _runs(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int, list[torch.Tensor]]]:
    """The connected runs of overlapping byte spans of ``tensors`` (one storage's): (first, last, members)."""
    runs: list[list] = []  # [first, last, members]
    for t in sorted(tensors, key=lambda t: _span(t)[0]):
        first, last = _span(t)
        if runs and first < runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], last)
            runs[-1][2].append(t)
        else:
            runs.append([first, last, [t]])
    return [(first, last, members) for first, last, members in runs]


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


@torch.no_grad()
def move_to_huge_pages(tensors: Iterable[torch.Tensor], every: Iterable[torch.Tensor]) -> tuple[int, int | None]:
    """Move the bytes of ``tensors`` into one huge-page arena, with every tensor of ``every`` (the model's
    parameters, buffers and fused tensors) that overlaps them (views keep their offsets). Returns (bytes moved,
    the arena's address, which :func:`move_out_of_huge_pages` takes), or (0, None) when nothing was done."""
    if thp_mode() not in ("always", "madvise"):
        return 0, None
    units = _units(list(tensors), list(every))
    # a checkpoint read in place (an fp32 safetensors file, memory-mapped) stays where it is: its pages are the
    # page cache's, and copying them out raised the loading peak past 1.1x the peak without injection
    # (default model fp32: 1142 vs 1023 MB through the first tokens)
    mapped = _file_mappings(mapped_checkpoints()) if sys.platform.startswith("linux") else []
    units = [u for u in units if not any(lo <= u[0] < hi for lo, hi in mapped)]
    total = sum(last - first for first, last, _ in units)
    if total < MIN_TOTAL:
        return 0, None
    spans = [-(-(last - first) // 64) * 64 for first, last, _ in units]  # cache-line aligned, as the allocator
    arena = torch.empty(sum(spans) + HUGE_PAGE, dtype=torch.uint8)  # large: fresh, untouched pages
    start = -(-arena.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    if _madvise()(start, sum(spans) // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE) != 0:
        return 0, None
    storage = arena.untyped_storage()
    offset, untrimmed = start - arena.data_ptr(), 0
    for (first, last, members), span in zip(units, spans):
        source = members[0].untyped_storage()
        old = _bytes_of(source)[first - source.data_ptr() : last - source.data_ptr()]
        arena[offset : offset + last - first].copy_(old)
        for t in members:
            size = t.element_size()
            t.set_(storage, (offset + t.data_ptr() - first) // size, t.size(), t.stride())
        del old, source  # heap memory (a checkpoint read in place never moves): freed with its last tensor
        untrimmed += last - first
        if untrimmed >= 4 << 20:
            # the freed storages' pages back to the kernel every 4 MiB copied (glibc keeps freed heap memory,
            # which the arena cannot reuse): else the move peaks at the weights twice over (measured on the
            # default model, int4: +45 MiB of the 73 MiB moved)
            release_free_heap()
            untrimmed = 0
        offset += span
    release_free_heap()
    return total, storage.data_ptr()


@torch.no_grad()
def move_out_of_huge_pages(every: Iterable[torch.Tensor], arena: int) -> None:
    """Give every tensor of ``every`` that lives in the arena at address ``arena`` ordinary memory again (one
    copy per storage it came from), so the arena is freed once nothing else refers to it."""
    arenas: dict[int, torch.Tensor] = {}
    for t in every:
        if t.device.type == "cpu" and t.untyped_storage().data_ptr() == arena:
            arenas.setdefault(id(t), t)
    # tensors that overlap (a fused tensor and its views) get one copy together and stay views of it
    for begin, end, ts in _runs(arenas.values()):
        fresh = torch.empty(end - begin, dtype=torch.uint8)
        source = ts[0].untyped_storage()
        fresh.copy_(_bytes_of(source)[begin - source.data_ptr() : end - source.data_ptr()])
        base = begin - source.data_ptr()
        for t in ts:
            size = t.element_size()
            t.set_(fresh.untyped_storage(), (t.storage_offset() * size - base) // size, t.size(), t.stride())

