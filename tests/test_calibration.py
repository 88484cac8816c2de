"""Calibrated MoQ (``FastInferConfig(calibration=...)``, quant/gptq.py): the algorithm against a float64
reference, its effect on held-out inputs, reloading, tiny families, encoders and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertModel

import hf_fastinfer
from hf_fastinfer import FastInferConfig, models
from hf_fastinfer.kernels.quant_format import dequantize_weight
from hf_fastinfer.quant import MoQLinear
from hf_fastinfer.quant.gptq import _group_params, _hessian_hooks, gptq_quantize
from hf_fastinfer.quant.search import quantize_linear_weight

from _helpers import saved_tiny_bert


def _correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    """Activations with the structure real ones have: correlated features of very different sizes."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=torch.Generator().manual_seed(1234)) / features ** 0.5
    scale = torch.logspace(-1, 1, features)[torch.randperm(features, generator=torch.Generator().manual_seed(99))]
    return (torch.randn(rows, features, generator=g) @ mixing) * scale


# -- the algorithm -------------------------------------------------------------------------------------------


def test_hessian_hooks_match_the_float64_formula():
    torch.manual_seed(0)
    q, k = nn.Linear(24, 8), nn.Linear(24, 4)  # fed the same tensor, as q_proj and k_proj are
    accumulators, handles = _hessian_hooks({"q": q, "k": k})
    batches = [torch.randn(3, 10, 24), torch.randn(2, 7, 24)]
    for x in batches:
        q(x), k(x)
    for h in handles:
        h.remove()
    rows = torch.cat([x.reshape(-1, 24) for x in batches]).double()
    expected = 2.0 / rows.shape[0] * rows.T @ rows
    for name in ("q", "k"):
        assert accumulators[name].rows == rows.shape[0]
        torch.testing.assert_close(accumulators[name].hessian.double(), expected, rtol=1e-5, atol=1e-5)


def _gptq_float64_reference(weight, hessian, bits, group_size, symmetric, static_groups, damping=0.01,
                            group_search=False):
    """GPTQ written as its defining recursion (optimal brain quantization, one column at a time), in float64
    and without blocks or Cholesky factors: quantize column i, spread its error over the remaining columns
    with the inverse Hessian of those columns, then remove column i from that inverse. Group parameters:
    RTN's on the original weight (static) or on the group's columns when its first column is reached."""
    scales, zeros, qmin, qmax = _group_params(weight, bits, group_size, symmetric)
    k = weight.shape[1]
    cols = torch.arange(k) // group_size
    s = scales.double()[:, cols]
    z = zeros.double()[:, cols] if zeros is not None else torch.zeros_like(s)
    w = weight.double().clone()
    energy = torch.diagonal(hessian).float().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h += damping * torch.diagonal(h).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    q = torch.empty(weight.shape, dtype=torch.int64)
    for i in range(k):
        if not static_groups and i % group_size == 0:
            stop = min(i + group_size, k)
            gs, gz, _, _ = _group_params(w[:, i:stop].float(), bits, stop - i, symmetric,
                                         energy[i:stop] if group_search else None)
            s[:, i:stop] = gs.double()
            if gz is not None:
                z[:, i:stop] = gz.double()
        qi = torch.round(w[:, i] / s[:, i] + z[:, i]).clamp(qmin, qmax)
        q[:, i] = qi.long()
        err = (w[:, i] - (qi - z[:, i]) * s[:, i]) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]
    return q


@pytest.mark.parametrize("static_groups,group_search", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (4, True), (8, True)])
def test_gptq_matches_the_float64_reference_recursion(bits, symmetric, static_groups, group_search):
    torch.manual_seed(0)
    weight = torch.randn(12, 80) * 0.05
    x = _correlated_inputs(400, 80, seed=1)
    hessian = 2.0 / x.shape[0] * x.T @ x
    hessian[:, 7] = hessian[7, :] = 0.0  # a dead input column
    # blocks of 32 columns (and a short last one): the blocked update must equal the plain recursion
    got = gptq_quantize(weight, hessian, bits, 16, symmetric, block_columns=32,
                        static_groups=static_groups, group_search=group_search).int_values().long()
    expected = _gptq_float64_reference(weight, hessian, bits, 16, symmetric, static_groups,
                                       group_search=group_search)
    # float32 against float64: a code may differ where a value sits on a rounding boundary, nowhere else
    assert (got == expected).float().mean() >= 0.995, (got != expected).sum()


def test_hessian_hooks_record_the_stages_of_a_decoder_block_in_call_order():
    model = models.tiny("llama")
    block = model.model.layers[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    stages = []
    _, handles = _hessian_hooks(linears, stages)
    model(torch.randint(3, 200, (2, 9)))
    for h in handles:
        h.remove()
    assert [sorted(stage) for stage in stages] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def test_the_group_range_search_lowers_the_weighted_error_of_a_group():
    torch.manual_seed(0)
    weight = torch.randn(64, 32) * 0.05
    weight[:, 0] *= 8  # an outlier column stretches every row's min / max
    energy = torch.rand(32) + 0.1
    for importance in (None, energy):
        s, z, qmin, qmax = _group_params(weight, 4, 32, False, importance)
        q = torch.round(weight / s.float() + z.float()).clamp(qmin, qmax)
        error = ((q - z.float()) * s.float() - weight).pow(2) * energy
        if importance is None:
            rtn_error = error.sum()
        else:
            assert error.sum() < rtn_error


def test_gptq_output_error_on_held_out_inputs_is_a_fraction_of_round_to_nearest():
    torch.manual_seed(0)
    weight = torch.randn(64, 128) * 0.05
    calibration, held_out = _correlated_inputs(2048, 128, seed=1), _correlated_inputs(512, 128, seed=2)
    hessian = 2.0 / calibration.shape[0] * calibration.T @ calibration
    reference = held_out @ weight.T
    for bits in (4, 8):
        rtn = dequantize_weight(quantize_linear_weight(weight, bits, 32, bits == 8))
        gptq = dequantize_weight(gptq_quantize(weight, hessian, bits, 32, bits == 8))
        rtn_error = (held_out @ rtn.T - reference).pow(2).sum()
        gptq_error = (held_out @ gptq.T - reference).pow(2).sum()
        assert gptq_error < 0.8 * rtn_error, (bits, float(gptq_error / rtn_error))


# -- models --------------------------------------------------------------------------------------------------


def _saved_tiny(tmp_path, family="llama", **overrides):
    model = models.tiny(family, **overrides)
    folder = tmp_path / family
    model.save_pretrained(folder)
    return model, folder


def _ids(vocab, sequences, length, seed):
    return torch.randint(0, vocab, (sequences, length), generator=torch.Generator().manual_seed(seed))


def _layer_errors(reference, quantized, ids):
    """Per Linear: squared output error of the quantized layer's weight on the inputs the float model's layer
    receives for ``ids`` (the same inputs for both models, so only the weights differ)."""
    inputs = {}
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, []).append(a[0].detach()))
               for n, m in reference.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        reference(ids)
    for h in handles:
        h.remove()
    errors = {}
    for name, xs in inputs.items():
        layer = quantized.get_submodule(name)
        if not isinstance(layer, MoQLinear):
            continue
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs])
        w = reference.get_submodule(name).weight.detach()
        errors[name] = float((x @ (layer.dequantize() - w).T).pow(2).sum())
    return errors


def test_calibrated_layers_beat_round_to_nearest_on_held_out_inputs(tmp_path):
    reference, folder = _saved_tiny(tmp_path)
    vocab = reference.config.vocab_size
    rtn = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=4))
    calibrated = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=FastInferConfig(bits=4, calibration=_ids(vocab, 16, 64, seed=1)))
    held_out = _ids(vocab, 4, 64, seed=2)
    rtn_errors, gptq_errors = _layer_errors(reference, rtn, held_out), _layer_errors(reference, calibrated, held_out)
    assert rtn_errors.keys() == gptq_errors.keys() and len(rtn_errors) >= 8
    better = [n for n in rtn_errors if gptq_errors[n] < rtn_errors[n]]
    assert len(better) == len(rtn_errors), {n: gptq_errors[n] / rtn_errors[n] for n in rtn_errors}
    with torch.no_grad():
        expected = reference(held_out).logits
        rtn_logits, gptq_logits = rtn(held_out).logits, calibrated(held_out).logits
    assert (gptq_logits - expected).norm() < (rtn_logits - expected).norm()


def test_calibrated_checkpoint_reloads_bit_identical_without_calibrating(tmp_path, monkeypatch):
    reference, folder = _saved_tiny(tmp_path)
    ids = _ids(reference.config.vocab_size, 8, 32, seed=3)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=4, calibration=ids))
    record = model.config.quantization_config.calibration
    assert record["method"] == "gptq" and record["source"] == "token_ids" and record["sequences"] == 8
    model.save_pretrained(tmp_path / "calibrated")

    from hf_fastinfer.quant import gptq

    def refuse(*args, **kwargs):
        raise AssertionError("a saved calibrated checkpoint must not be calibrated again")

    monkeypatch.setattr(gptq, "calibrate_model", refuse)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "calibrated")
    assert reloaded.config.quantization_config.calibration == record
    probe = _ids(reference.config.vocab_size, 2, 24, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(probe).logits, model(probe).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", models.TINY_FAMILIES)
def test_every_tiny_family_calibrates_and_generates(tmp_path, family):
    reference, folder = _saved_tiny(tmp_path, family)
    vocab = reference.config.vocab_size
    config = FastInferConfig(bits=4, calibration=_ids(vocab, 16, 64, seed=1))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    quantized = [m for m in model.modules() if isinstance(m, MoQLinear)]
    assert quantized and all(m.bits == 4 for m in quantized)
    rtn = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=4))
    held_out = _ids(vocab, 4, 64, seed=2)
    rtn_errors, gptq_errors = _layer_errors(reference, rtn, held_out), _layer_errors(reference, model, held_out)
    assert sum(gptq_errors.values()) < sum(rtn_errors.values()), family
    with torch.no_grad():
        out = model.generate(held_out[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_int8_and_auto_calibrate(tmp_path):
    reference, folder = _saved_tiny(tmp_path)
    vocab = reference.config.vocab_size
    ids, held_out = _ids(vocab, 16, 64, seed=1), _ids(vocab, 4, 64, seed=2)
    int8 = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=8, calibration=ids))
    rtn8 = AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=8))
    assert sum(_layer_errors(reference, int8, held_out).values()) < sum(_layer_errors(reference, rtn8, held_out).values())
    # bits="auto" ranks the layers by the calibrated int4 error and saves its choice
    auto = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=FastInferConfig(bits="auto", target_bits=6.0, calibration=ids))
    layer_bits = auto.config.quantization_config.layer_bits
    assert set(layer_bits.values()) == {4, 8}
    assert all(auto.get_submodule(n).bits == b for n, b in layer_bits.items())
    assert hf_fastinfer.report(auto).average_bits <= 6.0


def test_encoder_calibrates(tmp_path):
    reference = saved_tiny_bert(tmp_path / "bert")
    ids, held_out = _ids(300, 16, 32, seed=1), _ids(300, 4, 32, seed=2)
    rtn = BertModel.from_pretrained(tmp_path / "bert", quantization_config=FastInferConfig(bits=4))
    calibrated = BertModel.from_pretrained(tmp_path / "bert", quantization_config=FastInferConfig(bits=4, calibration=ids))
    assert all(isinstance(calibrated.get_submodule(n), MoQLinear) for n in _layer_errors(reference, rtn, held_out))
    assert sum(_layer_errors(reference, calibrated, held_out).values()) < \
        sum(_layer_errors(reference, rtn, held_out).values())


# -- bad input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ids,message", [
    (torch.empty(0, 8, dtype=torch.long), "empty"),
    ([], "empty"),
    (torch.rand(2, 8), "must be integers"),
    (torch.zeros(1, 5000, dtype=torch.long), "longer than this model's context"),
    (torch.full((1, 8), 10**6), "must lie in"),
    ([[1, 2, 3], [4, 5]], "equally long"),
    ("wikitext", "must be 'builtin'"),
])
def test_bad_calibration_input_is_refused_before_loading(tmp_path, ids, message):
    _, folder = _saved_tiny(tmp_path)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=FastInferConfig(bits=4, calibration=ids))


def test_calibration_needs_quantized_weights():
    with pytest.raises(ValueError, match="set bits=8, 4 or 'auto'"):
        FastInferConfig(bits=None, calibration="builtin")
