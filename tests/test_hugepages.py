"""Weights moved into transparent huge pages (hf_fastinfer.injection.hugepages): values and views kept, every
tensor of a storage moved together, the pages really huge, the inverse, and an injected model's tokens."""

from __future__ import annotations

import pytest
import torch

import hf_fastinfer
from hf_fastinfer import models
from hf_fastinfer.injection import injection_report
from hf_fastinfer.injection.hugepages import HUGE_PAGE, MIN_TOTAL, move_out_of_huge_pages, move_to_huge_pages, thp_mode

needs_thp = pytest.mark.skipif(thp_mode() not in ("always", "madvise"),
                               reason="needs Linux transparent huge pages (always or madvise)")


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages"))


@needs_thp
def test_storages_move_with_their_views_and_come_back():
    g = torch.Generator().manual_seed(0)
    whole = torch.randn(3 * 2048, 1024, generator=g)          # 24 MiB, with three views (a fused q/k/v)
    parts = [whole[:2048], whole[2048:4096], whole[4096:]]
    other = torch.randn(4096, 2048, generator=g).bfloat16()  # 16 MiB
    small = torch.randn(16)                                   # below MIN_BYTES: stays
    expected = [t.clone() for t in (whole, *parts, other, small)]
    before = _anon_huge_kib()
    moved, arena = move_to_huge_pages([whole, other, small], [whole, *parts, other, small])
    assert moved == whole.numel() * 4 + other.numel() * 2 and arena is not None
    for t, e in zip((whole, *parts, other, small), expected):
        assert torch.equal(t, e)
    # views still share the fused tensor's memory, at their offsets; all moved storages are one arena
    assert all(p.untyped_storage().data_ptr() == arena for p in parts) and other.untyped_storage().data_ptr() == arena
    assert parts[1].data_ptr() == whole.data_ptr() + 2048 * 1024 * 4
    assert small.untyped_storage().data_ptr() != arena
    assert _anon_huge_kib() - before >= (moved // HUGE_PAGE - 2) * HUGE_PAGE // 1024  # backed by huge pages
    whole.mul_(2)  # writes go through the views too
    assert torch.equal(parts[2], expected[3] * 2)
    move_out_of_huge_pages([whole, *parts, other, small], arena)
    assert all(t.untyped_storage().data_ptr() != arena for t in (whole, *parts, other))
    assert parts[1].data_ptr() == whole.data_ptr() + 2048 * 1024 * 4  # still views of one tensor
    assert torch.equal(other, expected[4]) and torch.equal(parts[0], expected[1] * 2)


def test_small_sets_and_gpu_less_setups_do_not_move():
    t = torch.randn(MIN_TOTAL // 8)  # half the total below which nothing moves
    assert move_to_huge_pages([t], [t]) == (0, None)


@needs_thp
def test_injected_model_streams_its_weights_from_huge_pages():
    """A model whose decode weights exceed MIN_TOTAL: moved at injection, the same tokens as transformers',
    and uninject gives them ordinary memory back."""
    kwargs = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=2,
                  num_hidden_layers=3)
    reference = models.tiny("llama", attn_implementation="sdpa", **kwargs)
    fast = models.tiny("llama", attn_implementation="fastinfer", **kwargs)
    report = hf_fastinfer.inject(fast)
    assert report.huge_page_bytes >= MIN_TOTAL and "huge pages" in str(report)
    arena = fast._hf_fastinfer_injection.huge_pages
    assert fast.model.layers[1].mlp.down_proj.weight.untyped_storage().data_ptr() == arena
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    kw = dict(max_new_tokens=12, do_sample=False)
    expected = reference.generate(ids, **kw)
    assert torch.equal(fast.generate(ids, cache_implementation="fastinfer", **kw), expected)
    hf_fastinfer.uninject(fast)
    assert all(t.untyped_storage().data_ptr() != arena for t in list(fast.parameters()) + list(fast.buffers()))
    assert torch.equal(fast.generate(ids, **kw), expected)
    assert injection_report(fast) is None
