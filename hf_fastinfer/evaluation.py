"""Perplexity on real English text that ships with CPython (``pydoc_data.topics``), for checking that a
fast path (quantized weights, int8 KV cache) keeps the model's quality.

Method: the first ``num_tokens`` tokens of the text are cut into non-overlapping windows of ``window``
tokens; each window is one forward pass from an empty cache (so every key/value attention reads went
through the cache under test) and predicts its own tokens 2..window. Perplexity is exp of the mean
negative log-likelihood over all predicted tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ._compat import cache_kwarg

__all__ = ["reference_text", "reference_tokens", "perplexity"]


def reference_text() -> str:
    """About 600k characters of English: the pydoc topic help texts, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def reference_tokens(tokenizer, num_tokens: int = 16384) -> torch.Tensor:
    """The first ``num_tokens`` tokens of :func:`reference_text`: [1, num_tokens] int64."""
    ids = tokenizer(reference_text(), return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < num_tokens:
        raise ValueError(f"the reference text has only {ids.shape[1]} tokens, fewer than {num_tokens}")
    return ids[:, :num_tokens]


@torch.inference_mode()
def perplexity(
    model,
    input_ids: torch.Tensor,
    window: int = 512,
    cache_factory: Callable[[], object] | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``input_ids`` ([1, N]) in non-overlapping windows of ``window`` tokens.

    cache_factory: builds a fresh cache for each window (e.g. ``lambda: build_cache("fastinfer_int8", ...)``);
    None uses the model's default.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, N], got {tuple(input_ids.shape)}")
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    starts = range(0, input_ids.shape[1] - 1, window)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        chunk = input_ids[:, start : start + window].to(device)
        if chunk.shape[1] < 2:
            break
        kwargs = {"use_cache": True}
        if cache_factory is not None:
            kwargs[cache_kwarg()] = cache_factory()
        logits = model(chunk, **kwargs).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_count += chunk.shape[1] - 1
    return math.exp(total_nll / total_count)
