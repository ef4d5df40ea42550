"""Compiles every Triton kernel of moefuse for NVIDIA GPUs on a machine without one.

The interpreter (TRITON_INTERPRET=1, what the tests use on the CPU) does not run Triton's
compiler, so errors that only native compilation finds (tl.dot operand dtypes, shared memory
over a target's limit, layout or type rules) would first show on a lent GPU. This script runs
the host wrappers of `kernels/` on small CPU tensors with the launch replaced: each launch is
compiled for sm_80 and sm_90 (`triton.compile` with an explicit target) and not run. The MoE
kernels are covered in every dtype and every tuned-table and autotune configuration; the merge
kernels as far as each method's host code gets on the unrun launches' outputs (the tie-count and
NaN/Inf-count kernels are not reached).

    python scripts/triton_compile_check.py [--arch 90]   # one line per kernel; exit 1 on a failure
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Set

os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported: real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ARCHS = (80, 90)
POINTER_TYPES = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.bool: "i1"}
OPTION_NAMES = ("num_warps", "num_stages")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
compiled: Dict[str, int] = {}  # kernel name -> compilations (one per distinct launch and target)
failures: List[str] = []
seen: Set[tuple] = set()


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for argument {value!r}")


def compile_launch(kernel: JITFunction, *args, grid=None, warmup=False, **kwargs) -> None:
    """Stands in for JITFunction.run: compiles this launch's specialization for every target and
    records the failures (the host code then goes on, its outputs left as allocated)."""
    values = dict(zip([p.name for p in kernel.params], args))
    values.update(kwargs)
    options = {name: values.pop(name) for name in OPTION_NAMES if name in values}
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        value = values[param.name] if param.name in values else param.default
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = "*" + POINTER_TYPES[value.dtype]
        else:
            signature[param.name] = _scalar_type(value)
    key = (kernel.__name__, str(signature), str(constexprs), str(options))
    if key in seen:
        return
    seen.add(key)
    for arch in ARCHS:
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as error:  # noqa: BLE001 - every compiler error is reported
            failures.append(f"{kernel.__name__} sm_{arch} {signature} {constexprs} {options}:\n{error}")
        compiled[kernel.__name__] = compiled.get(kernel.__name__, 0) + 1


def merge_kernels() -> None:
    """Every merge method, through the Triton backend, in each dtype. Host code that reads the
    results of launches that did not run may stop a method early; its launches so far count."""
    import moefuse
    from moefuse.ops import merge_triton

    merge_triton._prepared = lambda tensors: [t.contiguous() for t in tensors]  # lift the GPU-tensor check
    for dtype in DTYPES:
        base = torch.randn(300, 70).to(dtype)
        inputs = [(base.float() + 0.01 * torch.randn(300, 70)).to(dtype) for _ in range(3)]
        for method in moefuse.method_names():
            spec = moefuse.get_method(method)
            accepted = {param.name for param in spec.params}
            # Sparse settings (density below 1, L1 rescale) so that the selection kernels run too;
            # SLERP's required t; Model Stock also filter-wise (its row kernels).
            settings = (("density", 0.5), ("rescale", True), ("t", 0.3))
            params = {name: value for name, value in settings if name in accepted}
            for extra in ({"filter_wise": True}, {}) if "filter_wise" in accepted else ({},):
                try:
                    moefuse.merge_tensors(base if spec.needs_base else None, inputs[:spec.max_models], method,
                                          backend="triton", **params, **extra)
                except Exception:  # noqa: BLE001 - garbage read back, see above
                    pass


def moe_kernels() -> None:
    """Routing, token alignment and both grouped GEMMs in each dtype, with every launch config
    of the tuned table and of the autotuner, at a Mixtral-like (8 experts, top-2) and a
    Qwen3-MoE-like (128 experts, top-8) routing shape."""
    from moefuse.kernels import moe_align, moe_grouped_gemm as gemm, moe_routing

    configs = [config for _, config in gemm.CONFIGS] + [
        dict(choice.kwargs, num_warps=choice.num_warps, num_stages=choice.num_stages)
        for choice in gemm._autotuned(gemm._gate_up_kernel, 16).configs
    ]
    tokens, hidden, inter = 40, 96, 80
    for experts, top_k in ((8, 2), (128, 8)):
        ids = torch.randint(0, experts, (tokens, top_k), dtype=torch.int32)
        for dtype in DTYPES:
            logits = torch.randn(tokens, experts).to(dtype)
            for softmax_after in (False, True):
                for renormalize in (False, True):
                    moe_routing.route_forward(logits, top_k, softmax_after, renormalize)
            x = torch.randn(tokens, hidden).to(dtype)
            gate_up = torch.randn(experts, 2 * inter, hidden).to(dtype)
            down = torch.randn(experts, hidden, inter).to(dtype)
            weights = torch.rand(tokens, top_k).to(dtype)
            for config in configs:
                if dtype == torch.float32:
                    config = dict(config, BLOCK_K=min(config["BLOCK_K"], 32))  # as pick_config caps it
                sorted_ids, block_experts, _ = moe_align.align_forward(ids, experts, config["BLOCK_M"])
                h = gemm.gate_up_forward(x, gate_up, sorted_ids, block_experts, top_k, config)
                gemm.down_forward(h, down, sorted_ids, block_experts, weights, config)


def main() -> int:
    global ARCHS
    if "--arch" in sys.argv:
        ARCHS = (int(sys.argv[sys.argv.index("--arch") + 1]),)
    JITFunction.run = compile_launch
    moe_kernels()
    merge_kernels()
    for failure in failures:
        print("FAILED", failure, file=sys.stderr)
    for name, count in sorted(compiled.items()):
        print(f"{name}: {count} compilations")
    print(f"triton {triton.__version__}, targets sm_{', sm_'.join(map(str, ARCHS))}: "
          f"{len(failures)} failed of {sum(compiled.values())}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
