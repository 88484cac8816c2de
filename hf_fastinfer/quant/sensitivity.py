"""Mixture of quantization (``bits="auto"``): which layers keep int8 and which go to int4.

Measure: each layer's *Fisher-weighted output error*. One forward and backward pass of the model (its
layers in int8, which is within 0.2% perplexity of float) over ``CALIBRATION_TOKENS`` tokens of built-in text
records, for every quantized layer, its input X [T, in] and the gradient G [T, out] of the loss with respect
to its output. Moving the layer from int8 to int4 changes its output by dY = X @ (W4 - W8)^T, and to second
order the loss by about  0.5 * sum_t (G_t . dY_t)^2  (the empirical Fisher approximation). That score puts
every layer, whatever its shape or position, on the scale of the model's own loss, which a weight-only proxy
(e.g. the int4 weight error) cannot: on the default model it ranks the tied output projection first by far,
as end-to-end perplexity confirms.

Assignment: a greedy knapsack. Starting from all-int4, layers get int8 in order of score per weight until
the average bits per quantized weight (4 or 8 per weight; scales not counted) would exceed ``target_bits``.

Calibration text: the last part of :func:`hf_fastinfer.evaluation.reference_text`, which perplexity
measurements (the first 16,384 tokens) never read.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from hf_fastinfer.kernels.quant_format import dequantize_weight

__all__ = ["CALIBRATION_TOKENS", "calibration_ids", "layer_sensitivity", "assign_bits"]

CALIBRATION_TOKENS = 256
_CALIBRATION_CHARS = 4000  # comfortably more than CALIBRATION_TOKENS tokens of English


def calibration_ids(tokenizer, num_tokens: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """[1, num_tokens] token ids of built-in English text (disjoint from the perplexity text)."""
    from hf_fastinfer.evaluation import reference_text

    text = reference_text()[-_CALIBRATION_CHARS:]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] < num_tokens:
        raise ValueError(f"calibration text has {ids.shape[1]} tokens, fewer than {num_tokens}")
    return ids[:, -num_tokens:]


def _loss(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Causal LMs: next-token cross-entropy. Other models with logits: cross-entropy against their own
    predictions. Models without logits: half the mean square of the last hidden state."""
    out = model(input_ids=input_ids, use_cache=False) if _accepts_use_cache(model) else model(input_ids=input_ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return 0.5 * hidden.float().pow(2).mean()
    logits = logits.float()
    if getattr(model.config, "is_decoder", False) or type(model).__name__.endswith("ForCausalLM"):
        return torch.nn.functional.cross_entropy(logits[0, :-1], input_ids[0, 1:].to(logits.device), reduction="sum")
    flat = logits.reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, flat.argmax(-1), reduction="sum")


def _accepts_use_cache(model) -> bool:
    return hasattr(model.config, "use_cache")


def layer_sensitivity(model, layers: dict, input_ids: torch.Tensor, progress: bool = True) -> dict[str, float]:
    """Score per layer name for switching ``layers[name]`` (a MoQLinear holding its other quantization in
    ``.alternative``) from its current bits to the alternative's; see the module docstring."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def hook(name):
        def capture(module, args, output):
            inputs[name] = args[0].detach()
            outputs[name] = output
            return output
        return capture

    handles = [module.register_forward_hook(hook(name)) for name, module in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            # the hooks need a graph through every layer's output: let the first input carry one
            embeddings = model.get_input_embeddings()
            grad_handle = embeddings.register_forward_hook(lambda m, a, o: o.detach().requires_grad_(True))
            try:
                loss = _loss(model, input_ids.to(device))
            finally:
                grad_handle.remove()
            names = [n for n in layers if n in outputs and outputs[n].requires_grad]
            grads = torch.autograd.grad(loss, [outputs[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in layers if n not in names]
    if missing:
        raise RuntimeError(f"bits='auto': the calibration pass did not reach these layers: {missing[:5]}")

    scores = {}
    for name, grad in tqdm(list(zip(names, grads)), desc="MoQ sensitivity", disable=not progress, leave=False):
        module = layers[name]
        x = inputs[name].reshape(-1, module.in_features).float()
        g = torch.zeros_like(outputs[name], dtype=torch.float32) if grad is None else grad.float()
        g = g.reshape(-1, module.out_features)
        delta_w = dequantize_weight(module.alternative, torch.float32) - module.dequantize(torch.float32)
        delta_y = x @ delta_w.T  # [T, out]
        scores[name] = float(0.5 * (g * delta_y).sum(-1).pow(2).sum())
    return scores


def assign_bits(sizes: dict[str, int], scores: dict[str, float], target_bits: float) -> dict[str, int]:
    """Greedy int8/int4 split under ``target_bits`` average bits per weight (4 + 4 * int8 share)."""
    total = sum(sizes.values())
    budget = (float(target_bits) - 4.0) * total  # extra bits available over all-int4
    bits = {name: 4 for name in sizes}
    for name in sorted(sizes, key=lambda n: scores[n] / max(sizes[n], 1), reverse=True):
        cost = 4.0 * sizes[name]
        if cost <= budget:
            bits[name] = 8
            budget -= cost
    return bits
