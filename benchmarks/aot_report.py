"""Compile every Triton kernel ahead of time for NVIDIA GPUs (no GPU needed) and report what ptxas made of it.

For each kernel variant (default model's shapes and a 7B model's, decode and batched), ``triton.compile``
targets sm_80 (A100) and sm_90 (H100); Triton's bundled ``cuobjdump --dump-resource-usage`` then reports
registers per thread, stack and local memory (spills) and shared memory, and the PTX is searched for
tensor-core instructions (``mma.sync`` on sm_80, ``wgmma`` on sm_90). A kernel that only runs under the
interpreter fails here: compiling is the proof that it is a real GPU kernel.

    python benchmarks/aot_report.py            # print the table
    python benchmarks/aot_report.py --write    # and write it into BENCHMARKS.md
    python benchmarks/aot_report.py --json     # machine-readable (used by the tests)

Must run without TRITON_INTERPRET=1 (the kernels must be real JIT functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("aot_report.py compiles real GPU kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_section  # noqa: E402

from hf_fastinfer.kernels import decode_attention as _da  # noqa: E402
from hf_fastinfer.kernels import gated_act as _ga  # noqa: E402
from hf_fastinfer.kernels import kv_quant as _kv  # noqa: E402
from hf_fastinfer.kernels import quant_matmul as _qm  # noqa: E402
from hf_fastinfer.kernels import rms_norm as _rn  # noqa: E402
from hf_fastinfer.kernels import rotary as _ro  # noqa: E402

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}
_FLOAT_ARGS = {"sm_scale", "softcap", "eps"}


def _signature(fn, pointer_types: dict[str, str], constexprs: dict) -> tuple[dict, dict]:
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointer_types[name]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    return signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()}


def variants():
    """(kernel, case, fn, pointer types, constexprs, num_warps, expects tensor cores)."""
    out = []
    # decode attention: SmolLM2-135M (9 q / 3 kv heads, D 64), Mistral-7B (32 / 8, D 128), Llama-2-7B (32 / 32)
    for model, groups, head_dim in (("SmolLM2-135M", 3, 64), ("Mistral-7B", 4, 128), ("Llama-2-7B", 1, 128)):
        for kv in ("bf16", "int8"):
            ptrs = {"q_ptr": "*bf16", "k_ptr": f"*{'i8' if kv == 'int8' else 'bf16'}",
                    "v_ptr": f"*{'i8' if kv == 'int8' else 'bf16'}", "k_scale_ptr": "*fp16", "v_scale_ptr": "*fp16",
                    "mask_ptr": "*i8", "o_ptr": "*fp32", "lse_ptr": "*fp32"}
            const = dict(HEAD_DIM=head_dim, BLOCK_R=max(16, triton.next_power_of_2(groups)),
                         BLOCK_N=64 if head_dim <= 64 else 32,  # as the launcher picks
                         BLOCK_D=head_dim, HAS_MASK=True, QUANTIZED=kv == "int8", HAS_SOFTCAP=False)
            out.append(("decode_attention_split", f"{model}, {kv} KV, 1 query", _da._decode_attention_split_kernel,
                        ptrs, const, 4, False))
        out.append(("decode_attention_merge", f"{model}", _da._decode_attention_merge_kernel,
                    {"o_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
                    dict(HEAD_DIM=head_dim, BLOCK_S=16, BLOCK_D=head_dim), 4, False))
    # quantized matmul: (M rows of activations) at the default model's and 7B in/out features; the block
    # sizes come from the launcher's own heuristic, so these are the kernels that run.
    for bits in (8, 4):
        for m, note in ((1, "decode, batch 1"), (16, "batch 16"), (256, "prefill 256 tokens")):
            block_m, block_n, block_k, warps = _qm._block_sizes(m)
            ptrs = {"x_ptr": "*bf16", "w_ptr": "*i8" if bits == 8 else "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16",
                    "b_ptr": "*bf16", "y_ptr": "*bf16"}
            const = dict(BITS=bits, HAS_ZEROS=bits == 4, HAS_BIAS=False, IEEE_FP32=False,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
            out.append(("quant_matmul", f"W{bits}A16 bf16, M={m} ({note}); any K, N", _qm._quant_matmul_kernel,
                        ptrs, const, warps, m >= 16))
    # RMSNorm with the fused residual add: hidden 576 (SmolLM2), 4096 (7B), 14336 (a wide MLP row)
    for hidden in (576, 4096, 14336):
        block = triton.next_power_of_2(hidden)
        ptrs = {"x_ptr": "*bf16", "r_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "res_out_ptr": "*bf16"}
        out.append(("rms_norm", f"hidden {hidden}, bf16, + residual", _rn._rms_norm_kernel, ptrs,
                    dict(HAS_RESIDUAL=True, GEMMA=False, BLOCK_N=block), 4 if block <= 2048 else 8, False))
    # gated activation on a fused gate/up row: SmolLM2 (I = 1536) and 7B (I = 11008)
    for inner, act in ((1536, "silu"), (11008, "silu"), (11008, "gelu_tanh")):
        out.append(("gated_act", f"I = {inner}, bf16, {act}", _ga._gated_act_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"},
                    dict(ACT=_ga.ACTIVATIONS.index(act), BLOCK=min(1024, triton.next_power_of_2(inner))), 4, False))
    # rotary on q and k, one program per token: SmolLM2 (9 / 3 heads, D 64), Mistral-7B (32 / 8, D 128),
    # Phi-3 style partial rotary (32 / 32, D 96, R 32), interleaved (GPT-J style, 16 / 16, D 256, R 64)
    for label, hq, hk, d, r, inter in (("SmolLM2-135M", 9, 3, 64, 64, False), ("Mistral-7B", 32, 8, 128, 128, False),
                                       ("partial rotary", 32, 32, 96, 32, False), ("interleaved", 16, 16, 256, 64, True)):
        ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "qo_ptr": "*bf16", "ko_ptr": "*bf16", "cos_ptr": "*fp32",
                "sin_ptr": "*fp32", "pos_ptr": "*i64"}
        out.append(("rotary", f"{label}: {hq} / {hk} heads, D {d}, R {r}, bf16", _ro._rotary_kernel, ptrs,
                    dict(INTERLEAVED=inter, COPY_REST=r < d, BLOCK_H=triton.next_power_of_2(max(hq, hk)),
                         BLOCK_R=triton.next_power_of_2(r // 2), BLOCK_D=triton.next_power_of_2(d)), 4, False))
    # int8 KV quantize-and-append, one program per token: SmolLM2 (3 KV heads of 64), Llama-2-7B (32 of 128)
    for label, heads, d in (("SmolLM2-135M", 3, 64), ("Llama-2-7B", 32, 128)):
        ptrs = {"k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*i8", "vc_ptr": "*i8", "ks_ptr": "*fp16",
                "vs_ptr": "*fp16", "slot_ptr": "*i64"}
        out.append(("kv_append", f"{label}: {heads} KV heads x {d}, bf16", _kv._kv_append_kernel, ptrs,
                    dict(BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=d), 4, False))
    return out


def _resource_usage(cubin: bytes) -> dict:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {k.lower(): int(v) for k, v in fields.items()}


def compile_all() -> list[dict]:
    rows = []
    for kernel, case, fn, ptrs, const, warps, wants_tc in variants():
        signature, constexprs = _signature(fn, ptrs, const)
        for target_name, target in TARGETS.items():
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=target,
                                      options={"num_warps": warps})
            ptx = compiled.asm["ptx"]
            usage = _resource_usage(compiled.asm["cubin"])
            rows.append({
                "kernel": kernel, "case": case, "target": target_name, "num_warps": warps,
                "registers": usage.get("reg"), "stack": usage.get("stack"), "local": usage.get("local"),
                "shared_static": usage.get("shared"), "shared_total": compiled.metadata.shared,
                "mma": bool(re.search(r"\bmma\.sync", ptx)), "wgmma": "wgmma" in ptx,
                "expects_tensor_cores": wants_tc,
            })
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| kernel | case | target | warps | registers | stack / local bytes (spills) | shared bytes | tensor-core PTX |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        tc = ", ".join(name for name in ("mma", "wgmma") if r[name]) or "none"
        lines.append(f"| {r['kernel']} | {r['case']} | {r['target']} | {r['num_warps']} | {r['registers']} | "
                     f"{r['stack']} / {r['local']} | {r['shared_total']} | {tc} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of the table")
    args = parser.parse_args()
    rows = compile_all()
    if args.json:
        print(json.dumps(rows))
        return
    text = table(rows)
    print(text)
    if args.write:
        write_section("aot_report", "## Triton kernels compiled ahead of time (no GPU needed)\n\n"
                      f"Command: `python benchmarks/aot_report.py --write` (Triton {triton.__version__}).\n\n" + text)


if __name__ == "__main__":
    main()
