"""grouped_moe's Triton kernels compiled for a GPU, at model-sized shapes (skipped without CUDA):
against the reference, against transformers' grouped_mm experts, with autotuning, and bf16
natively (the interpreter tests widen bf16 tiles to fp32)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from moefuse import grouped_moe  # noqa: E402
from moefuse.kernels import moe_grouped_gemm  # noqa: E402
from moefuse.ops.grouped_moe_reference import grouped_moe_reference  # noqa: E402
from tests.ops.test_grouped_moe import assert_moe_close  # noqa: E402

if moe_grouped_gemm.interpreted():
    pytest.skip("TRITON_INTERPRET=1 is set; unset it to compile the kernels", allow_module_level=True)

# (tokens, experts, top_k, hidden, intermediate)
SHAPES = [
    (1, 8, 2, 4096, 14336),  # Mixtral-8x7B decode
    (16, 128, 8, 2048, 768),  # Qwen3-30B-A3B decode
    (777, 128, 8, 2048, 768),  # Qwen3-30B-A3B prefill, odd token count
    (513, 8, 2, 1000, 1500),  # sizes off the block grid
    (4096, 8, 2, 1024, 2048),  # many rows per expert (large BLOCK_M)
]


def _problem(tokens, experts, top_k, hidden, inter, dtype, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, hidden, device="cuda", generator=generator).to(dtype)
    gate_up = (torch.randn(experts, 2 * inter, hidden, device="cuda", generator=generator) / hidden ** 0.5).to(dtype)
    down = (torch.randn(experts, hidden, inter, device="cuda", generator=generator) / inter ** 0.5).to(dtype)
    logits = torch.randn(tokens, experts, device="cuda", generator=generator)
    weights, ids = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return x, gate_up, down, ids, weights


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{t}-E{e}-k{k}-H{h}-I{i}" for t, e, k, h, i in SHAPES])
def test_native_kernels_match_reference(shape, dtype):
    problem = _problem(*shape, dtype)
    assert_moe_close(grouped_moe(*problem), grouped_moe_reference(*problem))


def test_autotuned_kernels_match_reference():
    problem = _problem(300, 16, 2, 512, 768, torch.bfloat16)
    assert_moe_close(grouped_moe(*problem, autotune=True), grouped_moe_reference(*problem))


def test_matches_transformers_grouped_mm():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    x, gate_up, down, ids, weights = _problem(200, 32, 4, 512, 256, torch.bfloat16)
    config = Qwen3MoeConfig(hidden_size=512, moe_intermediate_size=256, num_experts=32)
    config._experts_implementation = "grouped_mm"
    experts = Qwen3MoeExperts(config).to("cuda", torch.bfloat16)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
        expected = experts(x, ids, weights.to(torch.bfloat16))
    # transformers rounds the gate-up and down outputs to bf16 before combining: a few roundings more.
    assert_moe_close(grouped_moe(x, gate_up, down, ids, weights.to(torch.bfloat16)), expected, ulps=16)


def test_out_of_range_expert_ids_fail_on_the_device():
    """On a GPU the id check is a device-side assert (no host sync per layer); it poisons the CUDA
    context, so it runs in a subprocess."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from moefuse import grouped_moe\n"
        "x = torch.randn(4, 64, device='cuda')\n"
        "gate_up, down = torch.randn(8, 256, 64, device='cuda'), torch.randn(8, 64, 128, device='cuda')\n"
        "ids = torch.full((4, 2), 8, device='cuda')\n"
        "grouped_moe(x, gate_up, down, ids, torch.ones(4, 2, device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode != 0 and "assert" in result.stderr.lower(), result.stderr[-2000:]
