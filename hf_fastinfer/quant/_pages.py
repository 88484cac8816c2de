"""Give back the pages of a checkpoint tensor once it has been quantized (or, for kernel injection, copied
into a fused projection).

transformers reads safetensors through a memory map, and the float tensors it hands to MoQ are views of
that map. Every page read stays resident in this process until loading ends, so without help the resident
set grows by the whole float checkpoint even though each tensor is quantized and dropped as it arrives.
After quantizing a tensor, MoQ asks the kernel to drop this process's pages under that tensor's bytes
(``madvise(MADV_DONTNEED)``), and only those: the range is shrunk to whole pages inside the tensor, so a
neighbouring tensor's pages are never touched, and only a range lying inside a mapping of a checkpoint file
is advised. The file is unchanged; a later read would fault the page in again from the page cache.
Linux only; elsewhere (or for tensors that are not views of the file) this does nothing.

The temporaries of quantization (a few MiB each) come from the C heap, and glibc keeps freed heap memory for
reuse instead of giving it back. Which holes it can reuse depends on the order of allocations across threads,
so the resident set after loading varied between runs by up to 270 MiB of *free* heap (int4 default model,
``benchmarks/load_memory.py``). :func:`release_free_heap` hands those free pages back (glibc's
``malloc_trim``, about 0.1-2 ms) after each quantized tensor, which keeps the peak at the model plus one
tensor's temporaries. It frees nothing in use and changes no allocator setting.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

__all__ = ["release_tensor_pages", "release_mapped_files", "mapped_checkpoints", "release_free_heap"]

_MADV_DONTNEED = 4
_state: dict = {}


def _madvise():
    if "madvise" not in _state:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _state["madvise"] = libc.madvise
    return _state["madvise"]


def release_free_heap() -> None:
    """Give the C heap's free pages back to the kernel (glibc's ``malloc_trim(0)``); elsewhere nothing."""
    if "trim" not in _state:
        trim = None
        if sys.platform.startswith("linux"):
            try:
                trim = ctypes.CDLL(None).malloc_trim  # glibc only (musl has no malloc_trim)
                trim.argtypes = [ctypes.c_size_t]
            except (AttributeError, OSError):
                trim = None
        _state["trim"] = trim
    if _state["trim"] is not None:
        _state["trim"](0)


def _file_mappings(paths: set[str]) -> list[tuple[int, int]]:
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.realpath(fields[5].strip()) in paths:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def mapped_checkpoints() -> set[str]:
    """The safetensors files this process has mapped (a loaded model's checkpoint, read in place)."""
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/self/maps") as maps:
            names = {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}
    except OSError:
        return set()
    return {os.path.realpath(n) for n in names if n.endswith(".safetensors")}


def release_tensor_pages(tensor: torch.Tensor, paths: set[str]) -> int:
    """Drop the resident pages under ``tensor``'s bytes if they belong to a mapping of one of ``paths``.

    Returns the number of bytes advised (0 when nothing applied)."""
    if not paths or not sys.platform.startswith("linux") or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return 0
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // page) * page, (end // page) * page  # whole pages inside the tensor
    if last <= first:
        return 0
    try:
        if not any(start <= first and last <= stop for start, stop in _file_mappings(paths)):
            return 0
    except OSError:
        return 0
    return last - first if _madvise()(first, last - first, _MADV_DONTNEED) == 0 else 0


def release_mapped_files(paths: set[str]) -> int:
    """Drop this process's resident pages of every mapping of ``paths`` (a checkpoint read in place).

    Tensor parallelism reads a row-wise shard as a column slice, which touches every page of the tensor; this gives
    them back. Safe for tensors that are still views of the file (a replicated embedding): the file is unchanged,
    so a later read faults the same bytes back in from the page cache. Returns the bytes advised."""
    if not paths or not sys.platform.startswith("linux"):
        return 0
    try:
        ranges = _file_mappings(paths)
    except OSError:
        return 0
    advised = 0
    for start, stop in ranges:
        if _madvise()(start, stop - start, _MADV_DONTNEED) == 0:
            advised += stop - start
    return advised
