"""Run under torchrun by tests/test_tensor_parallel.py: each rank loads models with FastInferConfig(tp_size=WORLD_SIZE)
and compares its greedy tokens with the same model loaded in one process (tp_size=1), in this same rank.

    torchrun --standalone --nproc-per-node 2 tests/tp_script.py families OUT.json FOLDER...
    torchrun --standalone --nproc-per-node 3 tests/tp_script.py default OUT.json
    torchrun ... tests/tp_script.py raise OUT.json FOLDER          (rank 1 raises after loading)
    torchrun --nnodes 2 ... tests/tp_script.py nodes OUT.json FOLDER

Rank 0 writes the results as JSON to OUT.json.
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

import hf_fastinfer
from hf_fastinfer.injection import injection_report
from hf_fastinfer.parallel import rank_bytes

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])


def batch(vocab: int) -> dict:
    """A left-padded batch of two prompts (pad id 0)."""
    ids = torch.tensor([[0, 0, 0, 5, 17, 99, 3, 250], [11, 42, 7, 300, 8, 41, 2, 19]]) % vocab
    mask = (torch.arange(8) >= torch.tensor([[3], [0]])).long()
    return {"input_ids": ids, "attention_mask": mask}


def tokens(model, inputs, new_tokens=12) -> list:
    out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def load(folder, bits, tp_size, config=None, **kwargs):
    # quantized weights with hf_fastinfer's attention, float ones with transformers' SDPA: both are covered
    attention = "sdpa" if bits is None else "fastinfer"
    return AutoModelForCausalLM.from_pretrained(
        folder, config=config, attn_implementation=attention,
        quantization_config=hf_fastinfer.FastInferConfig(bits=bits, tp_size=tp_size), **kwargs)


def compare(folder, bits, config=None, inputs=None, new_tokens=12, **kwargs) -> dict:
    single = load(folder, bits, 1, None if getattr(config, "quantization_config", None) else config)
    inputs = inputs or batch(single.config.vocab_size)
    expected = tokens(single, inputs, new_tokens)
    del single
    model = load(folder, bits, WORLD if not kwargs else 1, config, **kwargs)
    got = tokens(model, inputs, new_tokens)
    report = injection_report(model)
    layer = model.get_decoder().layers[0]
    q = getattr(layer.self_attn, "q_proj", None) or layer.self_attn.qkv_proj
    return {"equal": got == expected, "expected": expected, "got": got,
            "fused_blocks": len(report.fused_blocks) if report else 0,
            "decode_calls": getattr(layer.forward, "decode_calls", 0), "q_rows": int(q.out_features),
            # where each block rule came from (the vocabulary rules aside: the output projection's plan is the
            # model class's own, which a config cannot remove)
            "plan_sources": sorted({r.source for r in model._hf_fastinfer_tp.plan.rules.values()
                                    if not r.style.startswith("vocab")}),
            "vocab_rows": int(model.get_input_embeddings().weight.shape[0]),
            "rank_bytes": rank_bytes(model)}


def record_exit(out: str) -> None:
    """At exit, after hf_fastinfer's own exit handlers (atexit runs the last registered first): whether the process
    group hf_fastinfer joined is still alive, in OUT.json.exitRANK."""
    with open(f"{out}.exit{RANK}", "w") as handle:
        json.dump({"group_alive": torch.distributed.is_initialized()}, handle)


def main() -> None:
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    mode, out = sys.argv[1], sys.argv[2]
    atexit.register(record_exit, out)
    results = {}
    if mode == "families":
        for folder in sys.argv[3:]:
            name = os.path.basename(folder)
            for bits in (None, 8, 4):
                results[f"{name}/{bits}"] = compare(folder, bits)
        # a model without a tensor-parallel plan of its own: the plan is derived from its structure alone
        folder = sys.argv[3]
        config = AutoConfig.from_pretrained(folder)
        config.base_model_tp_plan = None
        results["planless/None"] = compare(folder, None, config=config)
        # transformers' own distributed_config: hf_fastinfer splits the model in the group transformers set up
        from transformers.distributed import DistributedConfig

        results["distributed_config/4"] = compare(folder, 4, distributed_config=DistributedConfig(tp_size=WORLD))
        # a checkpoint saved quantized (one process) loads split: each rank reads its rows / groups of it
        saved = os.path.join(os.path.dirname(out), "saved_int4")
        if RANK == 0:
            load(folder, 4, 1).save_pretrained(saved)
        torch.distributed.barrier()
        # a saved checkpoint loads with the settings it was saved with: tp_size goes through its config
        config = AutoConfig.from_pretrained(saved)
        config.quantization_config["tp_size"] = WORLD
        results["saved/4"] = compare(saved, 4, config=config)
    elif mode == "default":
        from transformers import AutoTokenizer

        from hf_fastinfer import models

        path = models.default_model_path()
        inputs = models.chat_inputs(AutoTokenizer.from_pretrained(path), models.CHAT_PROMPTS[:3])
        for bits in (None, 8):
            results[f"default/{bits}"] = compare(path, bits, inputs=inputs, new_tokens=16)
    elif mode == "raise":
        model = load(sys.argv[3], None, WORLD)
        if RANK == 1:
            raise RuntimeError("rank 1 failed on purpose")
        tokens(model, batch(model.config.vocab_size), 64)
    elif mode == "nodes":
        results["nodes"] = compare(sys.argv[3], 8)
        results["nodes"]["world"] = WORLD
    if RANK == 0:
        with open(out, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main()
