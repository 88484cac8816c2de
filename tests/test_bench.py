"""``python -m hf_fastinfer bench``: its measurements (bytes, cache bytes, peak memory), its errors, and a whole run
on the default model with its table, JSON and chart."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache

import hf_fastinfer
from hf_fastinfer import bench, models


def _cli(*args, timeout=900, cwd=None):
    return subprocess.run([sys.executable, "-m", "hf_fastinfer", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def _matrix_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() >= 2)


def test_weight_and_decode_read_bytes_count_a_tied_table_once_and_skip_an_untied_input_table():
    tied = models.tiny("llama", tie_word_embeddings=True)
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    table = tied.get_input_embeddings().weight
    table_bytes = table.numel() * table.element_size()
    expected = _matrix_bytes(tied)  # parameters() yields a tied weight once
    assert bench.weight_bytes(tied) == expected
    assert bench.decode_read_bytes(tied) == expected  # the tied table is read whole by the output projection
    untied = models.tiny("llama", tie_word_embeddings=False)
    assert bench.weight_bytes(untied) == _matrix_bytes(untied)
    assert bench.decode_read_bytes(untied) == _matrix_bytes(untied) - table_bytes


def test_cache_bytes_of_transformers_and_hf_fastinfer_caches():
    model = models.tiny("llama", attn_implementation="fastinfer")
    config = model.config
    ids = torch.randint(3, 200, (2, 10))
    dynamic = DynamicCache(config=config)
    model(ids, past_key_values=dynamic)
    heads, dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    per_layer = 2 * 2 * heads * 10 * dim * 4  # K and V, batch 2, 10 positions, fp32
    assert bench.cache_bytes(dynamic) == config.num_hidden_layers * per_layer
    ours = hf_fastinfer.FastInferCache(config, max_cache_len=64)
    model(ids, past_key_values=ours)
    capacity = ours.layers[0].capacity
    assert capacity >= 10
    assert bench.cache_bytes(ours) == config.num_hidden_layers * 2 * 2 * heads * capacity * dim * 4
    int8 = hf_fastinfer.FastInferInt8Cache(config, max_cache_len=64)
    model(ids, past_key_values=int8)
    # int8 K/V plus one fp16 scale per position and head for each
    assert bench.cache_bytes(int8) == config.num_hidden_layers * 2 * 2 * heads * capacity * (dim + 2)


def test_peak_memory_sees_a_transient_allocation():
    with bench.PeakMemory("cpu") as small:
        pass
    with bench.PeakMemory("cpu") as big:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    assert big.peak >= 60 * 2**20, big.peak
    assert small.peak < 32 * 2**20, small.peak


def test_paths_planned_per_dtype_and_bits():
    paths = bench.plan_paths(["float32", "bfloat16"], [None, 8])
    assert [p.label for p in paths] == [
        "transformers fp32", "hf_fastinfer fp32", "hf_fastinfer fp32 int8",
        "transformers bf16", "hf_fastinfer bf16", "hf_fastinfer bf16 int8"]
    assert {p.baseline for p in paths[:3]} == {"transformers fp32"}
    assert paths[2].load_kwargs()["quantization_config"].bits == 8
    assert paths[1].generate_kwargs == {"cache_implementation": "fastinfer"}
    peers = bench.plan_paths(["float32"], [4], cache="fastinfer_int8", peers=True)
    assert [p.label for p in peers] == ["transformers fp32", "hf_fastinfer fp32 int4 kv-int8", "torchao int8 fp32",
                                        "transformers fp32 static+compile"]
    assert peers[1].generate_kwargs == {"cache_implementation": "fastinfer_int8"}
    assert peers[3].generate_kwargs["cache_implementation"] == "static"
    both = bench.plan_paths(["float32"], [None], cache=["fastinfer", "fastinfer_int8"], baseline=False)
    assert [(p.label, p.generate_kwargs["cache_implementation"]) for p in both] == [
        ("hf_fastinfer fp32", "fastinfer"), ("hf_fastinfer fp32 kv-int8", "fastinfer_int8")]
    with pytest.raises(ValueError, match="--cache must be one of"):
        bench.plan_paths(["float32"], [None], cache="static")


@pytest.mark.parametrize("args, message", [
    (["--bits", "3"], "'3' is not one of None, 8, 4"),
    (["--cache", "fastinfer,static"], "'static' is not one of fastinfer, fastinfer_int8"),
    (["--dtype", "float8"], "'float8' is not one of float32, bfloat16, float16"),
    (["--batch", "1,x"], "invalid literal"),
    (["--tp", "2"], r"--tp 2: FastInferConfig\(tp_size=2\) does not divide the 3 KV heads.*work: 1, 3"),
    (["--new-tokens", "1"], "--new-tokens must be at least 2"),
    (["--batch", "0"], "--batch sizes must be positive"),
    (["--model", "/nonexistent/folder"], "not a model folder"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--repeats", "0"],
     "no CUDA device" if not torch.cuda.is_available() else "--repeats must be at least 1"),
])
def test_bad_arguments_are_refused_before_any_loading(args, message):
    proc = _cli(*args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    import re

    assert re.search(message, proc.stderr), proc.stderr[-2000:]


def test_help_lists_every_option():
    proc = subprocess.run([sys.executable, "-m", "hf_fastinfer", "bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for option in ("--model", "--dtype", "--bits", "--cache", "--tp", "--batch", "--json", "--plot", "--peers",
                   "--repeats", "--no-perplexity", "--prompt-tokens", "--new-tokens", "--device", "--threads"):
        assert option in proc.stdout, option


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def default_model_bench(tmp_path_factory):
    """One bench run on the default model (fp32, fp32 int8; batches 1 and 2): (its process, JSON report, chart)."""
    models.default_model_path()  # convert outside the timed subprocess
    folder = tmp_path_factory.mktemp("bench")
    out_json, out_png = folder / "bench.json", folder / "bench.png"
    proc = _cli("--bits", "none,8", "--batch", "1,2", "--prompt-tokens", "24", "--new-tokens", "6", "--repeats", "2",
                "--perplexity-tokens", "128", "--json", str(out_json), "--plot", str(out_png), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(out_json.read_text()), out_png


@pytest.mark.slow
def test_bench_runs_both_paths_and_writes_table_json_and_chart(default_model_bench):
    proc, report, out_png = default_model_bench
    assert "| transformers fp32 | 1 |" in proc.stdout and "| hf_fastinfer fp32 int8 | 2 |" in proc.stdout

    assert report["batches"] == [1, 2] and report["repeats"] == 2 and len(report["bandwidth_gbs"]) == 2
    results = {r["label"]: r for r in report["results"]}
    assert list(results) == ["transformers fp32", "hf_fastinfer fp32", "hf_fastinfer fp32 int8"]
    for r in results.values():
        for batch in ("1", "2"):
            assert len(r["prefill"][batch]) == 2 and len(r["decode"][batch]) == 2
            summary = r["summary"][batch]
            assert summary["decode_tps_median"] == pytest.approx(sorted(r["decode"][batch])[0] / 2
                                                                  + sorted(r["decode"][batch])[1] / 2)
            roofline = int(batch) * report["bandwidth_median_gbs"] * 1e9 / r["read_bytes"]
            assert summary["decode_roofline_tps"] == pytest.approx(roofline)
        assert r["kv_bytes"] > 0 and r["peak_bytes"] > 0 and 1 < r["perplexity"] < 100
    base, exact, int8 = results.values()
    assert exact["same_tokens"] is True and base["same_tokens"] is None
    assert exact["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    assert int8["weight_bytes"] < 0.6 * base["weight_bytes"]

    width, height = _png_size(out_png)
    assert width >= 1000 and height >= 700 and out_png.stat().st_size > 30_000


@pytest.mark.slow
def test_bench_int8_decodes_clearly_faster_than_fp32(default_model_bench):
    _, report, _ = default_model_bench
    base, _, int8 = report["results"]
    # int8 weights read about a quarter of the fp32 bytes per token: decode must be clearly faster
    assert int8["summary"]["1"]["decode_tps_median"] > 1.5 * base["summary"]["1"]["decode_tps_median"]


@pytest.mark.slow
@pytest.mark.distributed
def test_bench_tp2_runs_hf_fastinfer_paths_over_two_ranks(tmp_path):
    """--tp 2: the hf_fastinfer paths load over two ranks (this process drives the other), transformers' in one."""
    from transformers import AutoTokenizer

    folder = tmp_path / "model"
    models.tiny("llama", vocab_size=49152).save_pretrained(folder)  # the default model's tokenizer fits its vocabulary
    AutoTokenizer.from_pretrained(models.default_model_path()).save_pretrained(folder)
    out_json = tmp_path / "bench.json"
    proc = _cli("--model", str(folder), "--tp", "2", "--bits", "none,8", "--batch", "1", "--prompt-tokens", "16",
                "--new-tokens", "4", "--repeats", "1", "--perplexity-tokens", "64", "--json", str(out_json),
                "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["label"]: r for r in json.loads(out_json.read_text())["results"]}
    assert list(results) == ["transformers fp32", "hf_fastinfer fp32 tp=2", "hf_fastinfer fp32 int8 tp=2"]
    base, exact = results["transformers fp32"], results["hf_fastinfer fp32 tp=2"]
    assert exact["same_tokens"] is True
    assert exact["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)


@pytest.mark.slow
def test_bench_peers_run_or_say_why_not(tmp_path):
    models.default_model_path()
    out_json = tmp_path / "bench.json"
    proc = _cli("--bits", "8", "--batch", "1", "--prompt-tokens", "16", "--new-tokens", "4", "--repeats", "1",
                "--no-perplexity", "--peers", "--json", str(out_json), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = {r["label"]: r for r in json.loads(out_json.read_text())["results"]}
    compiled = results["transformers fp32 static+compile"]
    assert compiled["skipped"] is None and compiled["same_tokens"] is True
    torchao = results["torchao int8 fp32"]
    try:
        import torchao as _  # noqa: F401
    except ImportError:
        assert torchao["skipped"] == "torchao is not installed (pip install torchao)"
        assert "| torchao int8 fp32 | skipped: torchao is not installed" in proc.stdout
    else:
        assert torchao["skipped"] is None and torchao["weight_bytes"] < 0.6 * results["transformers fp32"]["weight_bytes"]
