"""Tensor parallelism (FastInferConfig(tp_size=N)): the plan, errors before loading, torchrun (one and two "nodes"),
notebook mode (this process drives spawned ranks) and failures.

Every multi-process test compares against the same model loaded in one process, and runs with a time limit so
that a hang fails instead of blocking CI.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_fastinfer
from hf_fastinfer import models
from hf_fastinfer.parallel import TensorParallelError, check_tp_size, derive_plan, valid_tp_sizes

SCRIPT = Path(__file__).with_name("tp_script.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **extra)
    return env


def _children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.is_running() and
            p.status() != psutil.STATUS_ZOMBIE]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp_models")
    folders = {}
    for family in FAMILIES:
        folders[family] = root / family
        models.tiny(family).save_pretrained(folders[family])
    return folders


def _torchrun(args: list[str], nproc: int, timeout: float, extra: list[str] | None = None, env=None):
    command = TORCHRUN + (extra or ["--standalone"]) + [f"--nproc-per-node={nproc}", str(SCRIPT)] + args
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or _env())


# -- the plan ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_plan_splits_reads_by_output_and_writes_by_input(family):
    model = models.tiny(family)
    plan = derive_plan(model, 2)
    styles = {name.rsplit(".", 1)[-1]: rule.style for name, rule in plan.rules.items()}
    # the vocabulary is split too: the embedding's rows (partial lookups summed), the output's rows (logits gathered)
    assert styles.pop("embed_tokens") == "vocab" and styles.pop("lm_head") == "vocab_colwise"
    if family == "phi3":
        assert styles == {"qkv_proj": "packed_colwise", "o_proj": "rowwise", "gate_up_proj": "packed_colwise",
                          "down_proj": "rowwise"}
        qkv = next(r for n, r in plan.rules.items() if n.endswith("qkv_proj"))
        assert qkv.parts == (64, 32, 32)  # 4 query heads, 2 KV heads of 16
        assert qkv.rows(1, 2) == [(32, 64), (80, 96), (112, 128)]  # rank 1: its half of q, of k and of v
    elif family in ("mixtral", "qwen2_moe"):
        assert styles == {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
        assert any("experts" in why for why in plan.replicated.values())
    else:
        assert styles == {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
                          "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    assert plan.all_reduces_per_block == (1 if family in ("mixtral", "qwen2_moe") else 2)
    if family == "llama":  # transformers ships a plan for Llama: ours agrees with it rule by rule
        assert {r.source for n, r in plan.rules.items() if "embed" not in n} == {"model plan"}


def test_plan_valid_sizes_and_errors():
    assert valid_tp_sizes(9, 3) == [1, 3]  # the default model
    assert valid_tp_sizes(32, 8, (14336,)) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"tp_size=2\) does not divide the 3 KV heads \(9 query heads\).*work: 1, 3"):
        check_tp_size(2, 9, 3)
    with pytest.raises(ValueError, match=r"larger than the 4 attention heads.*work: 1, 2"):
        check_tp_size(8, 4, 2)
    with pytest.raises(ValueError, match="does not divide the MLP widths"):
        check_tp_size(2, 4, 2, (63,))


def test_device_map_decides_the_backend_devices():
    from hf_fastinfer.parallel import _device_type

    assert [_device_type(m) for m in (None, "cpu", {"": "cpu"}, "cuda", {"": 1}, {"": "cuda:0"}, torch.device("cuda"))] \
        == ["cpu", "cpu", "cpu", "cuda", "cuda", "cuda", "cuda"]


def _saved(tmp_path, **overrides) -> Path:
    folder = tmp_path / "model"
    models.tiny("llama", **overrides).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config, error", [
    (dict(tp_size=2), r"does not divide the 3 KV heads \(9 query heads\).*work: 1, 3"),
    (dict(tp_size=16), r"larger than the 9 attention heads"),
    (dict(tp_size=3, tp_backend="nccl"), r"needs CUDA GPUs, and this machine has none"),
    (dict(tp_size=3, bits=4, calibration="builtin"), r"Calibrate with tp_size=1 and save_pretrained"),
    (dict(tp_size=3, bits="auto", target_bits=6), r"bits='auto'.*save_pretrained, then load"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, config, error):
    if config.get("tp_backend") == "nccl" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: NCCL is available")
    folder = _saved(tmp_path, num_attention_heads=9, num_key_value_heads=3, hidden_size=72, intermediate_size=96)
    before = len(_children())
    with pytest.raises(ValueError, match=error):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=hf_fastinfer.FastInferConfig(**config))
    assert not torch.distributed.is_initialized()
    assert len(_children()) == before  # no rank was started


def test_world_size_mismatch_is_refused(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"tp_size=2\) needs 2 processes, but this one runs in a world of 3"):
        AutoModelForCausalLM.from_pretrained(folder, quantization_config=hf_fastinfer.FastInferConfig(tp_size=2))
    assert not torch.distributed.is_initialized()


def test_conflicting_distributed_config_is_refused(tmp_path):
    from hf_fastinfer.parallel import _adopt_distributed_config
    from transformers.distributed import DistributedConfig

    model = models.tiny("llama")
    model.config.distributed_config = DistributedConfig(tp_size=2)
    with pytest.raises(ValueError, match=r"tp_size=4\) conflicts with distributed_config"):
        _adopt_distributed_config(model, hf_fastinfer.FastInferConfig(tp_size=4))
    model.config.distributed_config = DistributedConfig(tp_size=2, tp_plan={"model.layers.*.mlp.up_proj": "colwise"})
    with pytest.raises(ValueError, match="a custom tp_plan"):
        _adopt_distributed_config(model, hf_fastinfer.FastInferConfig(tp_size=2))
    model.config.distributed_config = DistributedConfig(tp_size=2)
    config = hf_fastinfer.FastInferConfig()  # tp_size=1: distributed_config's size is taken
    assert _adopt_distributed_config(model, config) and config.tp_size == 2


# -- torchrun ---------------------------------------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_tp2_equals_one_process_on_every_family(tiny_folders, tmp_path):
    out = tmp_path / "out.json"
    run = _torchrun(["families", str(out)] + [str(f) for f in tiny_folders.values()], 2, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 3 * len(FAMILIES) + 3  # + plan-less, distributed_config, saved quantized checkpoint
    for key, result in results.items():
        assert result["equal"], (key, result["expected"], result["got"])
        assert result["fused_blocks"] == 2 and result["decode_calls"] > 0, key  # kernel injection on the shards
        assert result["q_rows"] in (32, 64 // 2 + 2 * 32 // 2), key  # this rank's half of q (or of q, k, v)
    assert results["planless/None"]["plan_sources"] == ["AutoTP"]
    assert results["llama/None"]["plan_sources"] == ["model plan"]
    assert results["llama/None"]["vocab_rows"] == 256  # this rank's half of the 512-row embedding
    # the group hf_fastinfer joined is destroyed at exit, before the interpreter finalises (a gloo group alive then
    # can abort a rank: "terminate called without an active exception")
    for rank in range(2):
        assert json.loads((tmp_path / f"out.json.exit{rank}").read_text()) == {"group_alive": False}


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_default_model_tp3(tmp_path):
    models.default_model_path()  # converted once, before three ranks read it
    out = tmp_path / "out.json"
    run = _torchrun(["default", str(out)], 3, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    for key in ("default/None", "default/8"):
        assert results[key]["equal"], (key, results[key]["expected"], results[key]["got"])
        assert results[key]["q_rows"] == 3 * 64  # 9 heads of 64 over 3 ranks
        total, split = results[key]["rank_bytes"]
        assert 0 < split <= total  # the tied embedding / output pair, both split, counts once


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_two_nodes_over_loopback(tiny_folders, tmp_path):
    """Two torchrun invocations, one process each, joined as two nodes by a c10d rendezvous on 127.0.0.1."""
    out = tmp_path / "out.json"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for node in (0, 1):
        command = TORCHRUN + ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}", "--rdzv-backend=c10d",
                              f"--rdzv-endpoint={endpoint}", "--rdzv-id=hf_fastinfer_test", "--max-restarts=0",
                              str(SCRIPT), "nodes", str(out), str(tiny_folders["llama"])]
        nodes.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()))
    outputs = [p.communicate(timeout=600) for p in nodes]
    assert all(p.returncode == 0 for p in nodes), [o[1][-3000:] for o in outputs]
    result = json.loads(out.read_text())["nodes"]
    assert result["world"] == 2 and result["equal"], result


@pytest.mark.distributed
@pytest.mark.slow
def test_torchrun_a_rank_that_raises_ends_every_rank(tiny_folders, tmp_path):
    start = time.monotonic()
    run = _torchrun(["raise", str(tmp_path / "out.json"), str(tiny_folders["llama"])], 2, timeout=300)
    assert run.returncode != 0
    assert "rank 1 failed on purpose" in run.stderr + run.stdout
    assert time.monotonic() - start < 240  # ended by the error, not by a timeout


@pytest.mark.distributed
def test_torchrun_rendezvous_that_never_completes_times_out(tiny_folders, tmp_path):
    """One of two nodes never comes: the rendezvous fails after its join timeout, with a clear error."""
    command = TORCHRUN + ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                          f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=lonely", "--rdzv-conf=join_timeout=10",
                          "--max-restarts=0", str(SCRIPT), "nodes", str(tmp_path / "out.json"), str(tiny_folders["llama"])]
    start = time.monotonic()
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode != 0
    assert "RendezvousTimeoutError" in run.stderr or "timed out" in run.stderr.lower(), run.stderr[-3000:]
    assert time.monotonic() - start < 90


# -- notebook mode: this process is rank 0 -----------------------------------------------------------------------

def _notebook_inputs(vocab: int) -> dict:
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3, 250], [11, 42, 7, 300, 8, 41, 2, 19]]) % vocab
    return {"input_ids": ids, "attention_mask": (torch.arange(8) >= torch.tensor([[3], [0]])).long()}


class _Collector:
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1))

    def end(self):
        pass


@pytest.mark.distributed
@pytest.mark.slow
def test_notebook_mode_tp2_equals_one_process(tiny_folders):
    folder = tiny_folders["llama"]
    single = AutoModelForCausalLM.from_pretrained(folder, quantization_config=hf_fastinfer.FastInferConfig(bits=8))
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=hf_fastinfer.FastInferConfig(bits=8,
                                                                                                         tp_size=2))
    workers = model._hf_fastinfer_tp.workers
    assert workers is not None and len(workers.processes) == 1
    inputs = _notebook_inputs(model.config.vocab_size)
    try:
        one = {k: v[1:] for k, v in inputs.items()}  # assisted decoding takes one sequence
        for batch, kwargs in ((inputs, dict(do_sample=False)), (inputs, dict(num_beams=3, do_sample=False)),
                              (one, dict(prompt_lookup_num_tokens=3, do_sample=False)),
                              (inputs, dict(do_sample=False, cache_implementation="fastinfer")),
                              (inputs, dict(do_sample=False, cache_implementation="fastinfer_int8"))):
            expected = single.generate(**batch, max_new_tokens=10, pad_token_id=0, **kwargs)
            got = model.generate(**batch, max_new_tokens=10, pad_token_id=0, **kwargs)
            assert torch.equal(got, expected), kwargs
        streamed = _Collector()  # a streamer runs on rank 0 only: the workers see forward calls, not generate's
        got = model.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=0, streamer=streamed)
        assert torch.cat(streamed.chunks, dim=-1).flatten().tolist() == got.flatten().tolist()
        torch.manual_seed(3)
        expected = single.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(3)
        got = model.generate(**inputs, max_new_tokens=10, do_sample=True, top_k=20, pad_token_id=0)
        assert torch.equal(got, expected)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits, single(**inputs).logits, rtol=1e-4, atol=1e-4)
        text = str(hf_fastinfer.report(model))
        assert "tp_size=2" in text and "rank 0 of 2" in text and "all-reduces" in text
        with pytest.raises(RuntimeError, match="split over ranks this process drives"):
            hf_fastinfer.inject(model)  # its probe would run collectives the other ranks do not join
    finally:
        pids = [p.pid for p in workers.processes]
        del model
        import gc

        gc.collect()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                              for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not torch.distributed.is_initialized()  # the process group went with the model


@pytest.mark.distributed
@pytest.mark.slow
def test_notebook_mode_worker_killed_from_outside_gives_a_clear_error(tiny_folders):
    model = AutoModelForCausalLM.from_pretrained(tiny_folders["qwen2"],
                                                 quantization_config=hf_fastinfer.FastInferConfig(tp_size=2))
    workers = model._hf_fastinfer_tp.workers
    try:
        os.kill(workers.processes[0].pid, signal.SIGKILL)
        workers.processes[0].join(timeout=10)
        start = time.monotonic()
        with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) was killed by signal 9"):
            model.generate(**_notebook_inputs(model.config.vocab_size), max_new_tokens=4, pad_token_id=0)
        assert time.monotonic() - start < 30
    finally:
        workers.close()
    assert not torch.distributed.is_initialized()
    assert not any(p.is_alive() for p in workers.processes)
    with pytest.raises(TensorParallelError, match="shut down"):
        model(**_notebook_inputs(model.config.vocab_size))


@pytest.mark.distributed
@pytest.mark.slow
def test_notebook_mode_splits_a_saved_quantized_checkpoint(tiny_folders, tmp_path):
    """A saved checkpoint loads with its own settings: tp_size goes through its config, on every rank."""
    from transformers import AutoConfig

    single = AutoModelForCausalLM.from_pretrained(tiny_folders["qwen3"],
                                                  quantization_config=hf_fastinfer.FastInferConfig(bits=4))
    single.save_pretrained(tmp_path / "saved")
    config = AutoConfig.from_pretrained(tmp_path / "saved")
    config.quantization_config["tp_size"] = 2
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", config=config)
    try:
        assert model.model.layers[0].self_attn.q_proj.out_features == 32  # this rank's half of 4 heads of 16
        inputs = _notebook_inputs(model.config.vocab_size)
        expected = single.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=0), expected)
    finally:
        hf_fastinfer.parallel.shutdown(model)
