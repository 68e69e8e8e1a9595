"""Compile the fused MoE kernels for NVIDIA GPUs ahead of time, on any machine (no GPU needed), and report what
each uses: registers per thread, spilled bytes (local memory), and shared memory against the GPU's limit.

Triton's interpreter (how CI runs the kernels) never compiles them, so a kernel that no longer compiles for a GPU,
spills registers or asks for more shared memory than the GPU has would pass CI unnoticed. This script closes that
gap: `modeling_tests/test_fused_moe.py` runs it with `--check`, which exits 1 on any such kernel. It compiles every
tile configuration in `llada_moe_hf/fused_moe_configs_llada_moe.py` (and the defaults for other GPUs), for 16-bit
and float32 weights, plus the routing and backward kernels, with Triton's bundled ptxas.

    python benchmarks/kernel_resources.py --out benchmarks/results/kernel_resources.json
    python benchmarks/kernel_resources.py --check --quick   # what the test runs: H100 table, bf16, sm_90

Speed still needs a GPU (benchmarks/moe_layer.py); this only says the kernels build and fit.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time


os.environ["TRITON_INTERPRET"] = "0"  # compile for real: the interpreter never builds a kernel
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default of the Triton versions the tables were tuned on

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llada_moe_hf import fused_moe_llada_moe as fused  # noqa: E402
from llada_moe_hf.fused_moe_configs_llada_moe import FUSED_MOE_CONFIGS  # noqa: E402
from provenance import git_state  # noqa: E402


# Compute capability -> (name, shared memory per block an opt-in kernel may use, bytes).
TARGETS = {90: ("H100/H200 (sm_90)", 232448), 80: ("A100 (sm_80)", 166912)}
# A tuned table is built for its own GPU only; the defaults (and candidates) for every target.
GPU_CAPABILITY = {"H100": 90, "H200": 90, "GH200": 90, "A100": 80}


def capability_of(source: str) -> int | None:
    return next((cap for name, cap in GPU_CAPABILITY.items() if name in source), None)
SHAPE = {"E": 64, "k": 8, "H": 2048, "I": 1024}
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

# Pointer element types of every kernel argument ("W" stands for the model dtype).
POINTERS = {
    "x_ptr": "W", "w_ptr": "W", "h_ptr": "W", "gu_ptr": "W", "y_ptr": "W", "routing_ptr": "W",
    "routing_rows_ptr": "W", "grad_act_ptr": "W", "grad_gu_ptr": "W",
    "grad_routing_ptr": "fp32", "expert_ids_ptr": "i64", "pair_row_ptr": "i64",
}  # fmt: skip


# Integer arguments of the real layer (contiguous tensors); the pair and row counts vary, so they stay generic.
_E, _H, _I = SHAPE["E"], SHAPE["H"], SHAPE["I"]
GATE_UP_SCALARS = {
    "N": _I, "K": _H, "stride_xm": _H, "stride_xk": 1, "stride_we": 2 * _I * _H, "stride_wn": _H, "stride_wk": 1,
    "stride_hm": _I, "stride_gm": 2 * _I,
}  # fmt: skip
DOWN_SCALARS = {
    "N": _H, "K": _I, "stride_hm": _I, "stride_we": _H * _I, "stride_wn": _I, "stride_wk": 1, "stride_ym": _H,
}  # fmt: skip
SWIGLU_SCALARS = {"N": _I, "stride_gu": 2 * _I, "stride_ga": _I, "stride_ggu": 2 * _I, "stride_h": _I}


def compile_kernel(kernel, constexprs, scalars, dtype, capability, num_warps=4, num_stages=3):
    """Compile `kernel` for `capability`; returns its resource use (or the error)."""
    signature, attrs = {}, {}
    # Triton's launcher turns integer arguments equal to 1 into constants (unit strides: contiguous, vectorised
    # loads) and marks multiples of 16; do the same with the real layer's values.
    constexprs = {**constexprs, **{name: 1 for name, value in scalars.items() if value == 1}}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            kind = POINTERS.get(name, "i32")
            signature[name] = "*" + (dtype if kind == "W" else kind)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            signature[name] = "i32"
            if scalars.get(name, 1) % 16 == 0:  # what Triton's launcher specialises at run time
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(
        fn=kernel, signature=signature, attrs=attrs,
        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
    )  # fmt: skip
    start = time.perf_counter()
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    usage = resource_usage(compiled.asm["cubin"])
    usage.update(shared=compiled.metadata.shared, compile_s=round(time.perf_counter() - start, 2))
    return usage


def resource_usage(cubin: bytes) -> dict:
    """REG (registers per thread) and LOCAL (spilled bytes per thread) from cuobjdump, bundled with Triton."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True)
    fields = {}
    for line in text.stdout.splitlines():
        if "REG:" in line:
            fields = dict(item.split(":", 1) for item in line.split())
    return {"regs": int(fields["REG"]), "spill_bytes": int(fields["LOCAL"]) + int(fields.get("STACK", 0))}


def gemm_jobs(configs, dtypes):
    """(label, kernel, constexprs, scalars, dtype, launch options) for every distinct GEMM configuration."""
    seen, jobs = set(), []
    for source, table in configs:
        for tokens, config in table.items():
            for dtype in dtypes:
                fitted = fused._fit_to_dtype(config, torch.float32 if dtype == "fp32" else torch.bfloat16)
                for gemm, kernel in (("gate_up", fused._gate_up_kernel), ("down", fused._down_kernel)):
                    tiles = fitted[gemm]
                    stores = (False, True) if gemm == "gate_up" else (None,)
                    for store in stores:
                        constexprs = {
                            "BLOCK_M": fitted["BLOCK_M"], "BLOCK_N": tiles["BLOCK_N"], "BLOCK_K": tiles["BLOCK_K"],
                            "INTERPRET_BF16": False, "PRECISION": "ieee" if dtype == "fp32" else None,
                        }  # fmt: skip
                        if store is not None:
                            constexprs["STORE_GATE_UP"] = store
                        launch = {"num_warps": tiles.get("num_warps", 4), "num_stages": tiles.get("num_stages", 3)}
                        key = (gemm, dtype, tuple(sorted(constexprs.items())), tuple(sorted(launch.items())))
                        if key in seen:
                            continue
                        seen.add(key)
                        where = source if source.startswith("candidate") else f"{source}, T<={tokens}"
                        label = f"{gemm}{' +gate_up kept' if store else ''} [{where}]"
                        scalars = GATE_UP_SCALARS if gemm == "gate_up" else DOWN_SCALARS
                        jobs.append((label, kernel, constexprs, scalars, dtype, launch, fitted["BLOCK_M"], tiles))
    return jobs


def routing_jobs(block_ms):
    """The routing kernels at E=64 (E_POW2=64) for each BLOCK_M the tables use, and the SwiGLU backward."""
    e_pow2, chunk = 64, max(16, 8192 // 64)
    jobs = []
    for block_m in sorted(block_ms):
        jobs.append((
            f"align one launch [BLOCK_M={block_m}]", fused._align_single_kernel,
            {"BLOCK_M": block_m, "E_POW2": e_pow2, "CHUNK": chunk, "FILL": 1024, "TILES": max(16, 4096 // e_pow2)},
            {}, "bf16", {"num_warps": 8, "num_stages": 3}, block_m, None,
        ))  # fmt: skip
        jobs.append((
            f"align offsets [BLOCK_M={block_m}]", fused._align_offsets_kernel,
            {"BLOCK_M": block_m, "E_POW2": e_pow2, "CHUNKS_PER_STEP": max(16, 4096 // e_pow2), "FILL": 1024},
            {}, "bf16", {"num_warps": 4, "num_stages": 3}, block_m, None,
        ))  # fmt: skip
    for label, kernel in (("align count", fused._align_count_kernel), ("align scatter", fused._align_scatter_kernel)):
        jobs.append((label, kernel, {"E_POW2": e_pow2, "CHUNK": chunk}, {}, "bf16", {}, 0, None))
    for dtype in ("bf16", "fp32"):
        jobs.append((
            "swiglu backward", fused._swiglu_backward_kernel, {"BLOCK_N": 1024, "INTERPRET_BF16": False},
            SWIGLU_SCALARS, dtype, {}, 0, None,
        ))  # fmt: skip
    return jobs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a kernel fails to build, spills or overflows")
    parser.add_argument("--quick", action="store_true", help="H100 table only, bf16, sm_90 (what the test runs)")
    parser.add_argument(
        "--candidate", action="append", default=[], metavar="M,N,K,WARPS,STAGES",
        help="build only this candidate tile configuration (both GEMMs), to check it before adding it to the tables",
    )  # fmt: skip
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    shape_key = f"E={SHAPE['E']},H={SHAPE['H']},I={SHAPE['I']}"
    configs = [(gpu, table[shape_key]) for gpu, table in FUSED_MOE_CONFIGS.items() if shape_key in table]
    if not args.quick:
        configs.append(("default", {t: fused.default_config(t, SHAPE["E"], SHAPE["k"]) for t in (8, 64, 512, 4096)}))
    if args.candidate:  # only the candidates: the committed tables are what a plain run checks
        configs = []
    for text in args.candidate:
        try:
            block_m, block_n, block_k, warps, stages = (int(v) for v in text.split(","))
        except ValueError:
            parser.error(f"--candidate {text!r}: expected five integers M,N,K,WARPS,STAGES, e.g. 16,64,128,4,5")
        gemm = {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages}
        configs.append((f"candidate {text}", {0: {"BLOCK_M": block_m, "gate_up": gemm, "down": dict(gemm)}}))
    dtypes = ["bf16"] if args.quick else ["bf16", "fp16", "fp32"]
    capabilities = [90] if args.quick else sorted(TARGETS, reverse=True)
    jobs = gemm_jobs(configs, dtypes)
    if not args.candidate:
        jobs += routing_jobs({job[6] for job in jobs})

    results = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git": git_state(),
        "environment": {
            "python": platform.python_version(), "triton": triton.__version__, "platform": platform.platform(),
            "note": "compiled ahead of time with Triton's bundled ptxas; no GPU involved",
        },  # fmt: skip
        "shape": SHAPE,
        "kernels": [],
    }
    failures = []
    print(f"{'target':<18} {'kernel':<48} {'dtype':<5} {'tiles (M,N,K,warps,stages)':<28} {'regs':>4} "
          f"{'spill B':>7} {'shared KB':>9}")  # fmt: skip
    for capability in capabilities:
        target, shared_limit = TARGETS[capability]
        for label, kernel, constexprs, scalars, dtype, launch, block_m, tiles in jobs:
            if capability_of(label) not in (None, capability):
                continue
            row = {"target": target, "capability": capability, "kernel": label, "dtype": dtype, **launch}
            row.update({k: v for k, v in constexprs.items() if k.startswith("BLOCK")})
            try:
                row.update(compile_kernel(kernel, constexprs, scalars, DTYPES[dtype], capability, **launch))
            except Exception as err:  # noqa: BLE001 - every kernel is reported, the failure is the finding
                row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
                failures.append(f"{target} {label} {dtype}: {row['error']}")
                print(f"{target:<18} {label:<48} {dtype:<5} FAILED: {row['error'][:200]}", flush=True)
                results["kernels"].append(row)
                continue
            row["fits"] = row["shared"] <= shared_limit and row["spill_bytes"] == 0
            if not row["fits"]:
                failures.append(
                    f"{target} {label} {dtype}: {row['spill_bytes']} bytes spilled, {row['shared']} bytes of shared "
                    f"memory (limit {shared_limit})"
                )
            shape = f"{block_m},{tiles['BLOCK_N']},{tiles['BLOCK_K']}" if tiles else "-"
            shape += f",{launch.get('num_warps', 4)},{launch.get('num_stages', 3)}"
            print(
                f"{target:<18} {label:<48} {dtype:<5} {shape:<28} {row['regs']:>4} {row['spill_bytes']:>7} "
                f"{row['shared'] / 1024:>9.1f}{'' if row['fits'] else '  <-- does not fit'}",
                flush=True,
            )
            results["kernels"].append(row)
    results["failures"] = failures
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.out)
    print(f"{len(results['kernels'])} kernels compiled, {len(failures)} problems", flush=True)
    for failure in failures:
        print("  " + failure)
    if args.check and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
