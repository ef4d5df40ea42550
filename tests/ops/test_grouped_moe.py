"""grouped_moe (Triton kernels and CPU path) and its routing/alignment kernels against the
plain-PyTorch reference and against the transformers MoE modules of each family.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), so the sizes here stay small.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from moefuse import grouped_moe  # noqa: E402
from moefuse.errors import MoeInputError  # noqa: E402
from moefuse.kernels import moe_align, moe_grouped_gemm, moe_routing  # noqa: E402
from moefuse.ops.grouped_moe import route  # noqa: E402
from moefuse.ops.grouped_moe_reference import align_reference, grouped_moe_reference, route_reference  # noqa: E402

if moe_grouped_gemm.interpreted():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    pytest.skip("no GPU, and moefuse.kernels was imported before TRITON_INTERPRET=1 was set; "
                "run with TRITON_INTERPRET=1 in the environment", allow_module_level=True)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
# (tokens, experts, top_k, hidden, intermediate, routing): sizes off the block grid on purpose.
CASES = [
    (1, 4, 2, 32, 48, "random"),  # one token
    (3, 16, 4, 40, 24, "random"),  # more experts than tokens (most experts empty)
    (37, 6, 2, 33, 47, "random"),
    (64, 8, 1, 64, 32, "random"),  # top-1
    (40, 5, 1, 24, 40, "one_expert"),  # every token to expert 2
    (29, 10, 2, 48, 20, "two_experts"),  # experts other than 1 and 7 are empty
    (50, 7, 3, 17, 9, "random"),
]
CASE_IDS = [f"T{t}-E{e}-k{k}-H{h}-I{i}-{r}" for t, e, k, h, i, r in CASES]


def _routing(tokens, experts, top_k, kind, generator):
    if kind == "one_expert":
        ids = torch.full((tokens, 1), 2)
    elif kind == "two_experts":
        ids = torch.tensor([[1, 7], [7, 1]])[torch.randint(0, 2, (tokens,), generator=generator)]
    else:
        ids = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(ids.shape, generator=generator) + 0.1
    return ids.to(DEVICE), (weights / weights.sum(-1, keepdim=True)).to(DEVICE)


def _problem(case, dtype, seed=0):
    tokens, experts, top_k, hidden, inter, kind = case
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=generator) / hidden ** 0.5
    down = torch.randn(experts, hidden, inter, generator=generator) / inter ** 0.5
    ids, weights = _routing(tokens, experts, top_k, kind, generator)
    return x.to(DEVICE, dtype), gate_up.to(DEVICE, dtype), down.to(DEVICE, dtype), ids, weights


def assert_moe_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0) -> None:
    """|actual - expected| <= ulps * eps(dtype) * (|expected| + max|expected|) / 2, entrywise: a few
    roundings of the output dtype relative to the entry, with the output's scale as the floor
    near zero (fp32: 16 eps, for reordered sums). Names the first mismatches."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.double(), expected.double()
    eps = torch.finfo(expected.dtype).eps * (16 if expected.dtype == torch.float32 else ulps)
    bound = eps * (e.abs() + e.abs().max()) / 2
    bad = (a - e).abs() > bound
    if bad.any():
        where = torch.nonzero(bad)[:5].tolist()
        actual_values = [a[tuple(i)].item() for i in where]
        expected_values = [e[tuple(i)].item() for i in where]
        raise AssertionError(f"{int(bad.sum())} of {a.numel()} entries differ; first at {where}: "
                             f"actual {actual_values} expected {expected_values}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_triton_matches_reference(case, dtype):
    problem = _problem(case, dtype)
    assert_moe_close(grouped_moe(*problem, backend="triton"), grouped_moe_reference(*problem))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_path_matches_reference(case, dtype):
    problem = [t.cpu() for t in _problem(case, dtype)]
    # The CPU path rounds the down projection to the dtype before weighting: one rounding more.
    assert_moe_close(grouped_moe(*problem, backend="cpu"), grouped_moe_reference(*problem), ulps=3)


@pytest.mark.parametrize("limits", [(0, 0), (0, 2), (2, 2), (1, 3), (0, 1000), (1000, 1000)],
                         ids=["matmul-only", "tiles-then-matmul", "rows-then-matmul", "rows-tiles-matmul",
                              "tiles-only", "rows-only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cpu_kernels_and_matmul_split(case, dtype, limits, monkeypatch):
    """Experts with few rows go through the extension's row kernel, those with more through its
    tile kernel or torch.mm: in any split, mixed within one call, the result matches the reference."""
    from moefuse.ops import grouped_moe_cpu

    if grouped_moe_cpu._extension() is None:
        pytest.fail("C++ extension missing")
    monkeypatch.setattr(grouped_moe_cpu, "_kernel_limits", lambda weight: limits)
    problem = [t.cpu() for t in _problem(case, dtype, seed=1)]
    assert_moe_close(grouped_moe(*problem, backend="cpu"), grouped_moe_reference(*problem), ulps=3)


KERNEL_VARIANTS = [(torch.float32, False), (torch.float16, False), (torch.bfloat16, False), (torch.bfloat16, True)]


@pytest.mark.parametrize("tiles", [False, True], ids=["row-kernel", "tile-kernel"])
@pytest.mark.parametrize("dtype,bf16_dot", KERNEL_VARIANTS, ids=["fp32", "fp16", "bf16-fp32", "bf16-dot"])
@pytest.mark.parametrize("rows,n,k", [(1, 1, 1), (3, 5, 15), (4, 64, 16), (5, 67, 33), (9, 130, 1000), (13, 7, 0)])
def test_experts_linear_kernels(dtype, bf16_dot, tiles, rows, n, k):
    """The row and tile kernels against an fp64 matmul: K and N off the vector, tile and block
    sizes, rows beyond a whole row group, an expert with no rows, rows of an expert above
    max_rows untouched, x rows read with a stride, K = 0; bf16 both through fp32 and through
    AVX512-BF16 dot products (where the CPU has them)."""
    from moefuse.ops import grouped_moe_cpu

    extension = grouped_moe_cpu._extension()
    if extension is None:
        pytest.fail("C++ extension missing")
    if bf16_dot and not grouped_moe_cpu._bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16")
    generator = torch.Generator().manual_seed(rows * n * k + tiles)
    weight = torch.randn(4, n, k, generator=generator).to(dtype)
    counts = [rows, 0, 2, rows + 3]  # the last expert has more than max_rows = rows + 2 rows
    x = torch.randn(sum(counts), k + 3, generator=generator).to(dtype)[:, :k]  # rows k + 3 apart
    out = torch.full((sum(counts), n), 7.0, dtype=dtype)
    extension.experts_linear(x, weight, counts, 0 if tiles else rows + 2, rows + 2, out, bf16_dot)
    start = 0
    for expert, count in enumerate(counts[:3]):
        expected = (x[start:start + count].double() @ weight[expert].double().t()).to(dtype)
        torch.testing.assert_close(out[start:start + count], expected, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-4)
        start += count
    assert bool((out[start:] == 7.0).all())


def _extension_or_fail():
    from moefuse.ops import grouped_moe_cpu

    extension = grouped_moe_cpu._extension()
    if extension is None:
        pytest.fail("C++ extension missing")
    return extension


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("rows,inter", [(0, 8), (1, 1), (3, 17), (5, 64), (2, 1000)])
def test_silu_mul_kernel(dtype, rows, inter):
    """silu_mul_ against torch's SiLU(gate) * up in fp64 rounded once: inter off the vector size,
    rows with a stride, large and tiny gates, +-Inf, NaN and signed zeros. Results below the
    normal range may come out as zero (e^-g overflows for g < -88)."""
    generator = torch.Generator().manual_seed(rows * inter)
    buffer = torch.randn(rows, 2 * inter + 5, generator=generator) * 4
    if buffer.numel():
        specials = torch.tensor([0.0, -0.0, 80.0, -80.0, 100.0, -100.0, 1e-30, float("inf"), float("-inf"),
                                 float("nan")])
        buffer.view(-1)[:len(specials)] = specials[:buffer.numel()]
    gate_up = buffer.to(dtype)[:, :2 * inter]  # rows 2I + 5 apart
    gate, up = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    expected = (torch.nn.functional.silu(gate) * up).to(dtype)
    _extension_or_fail().silu_mul_(gate_up)
    torch.testing.assert_close(gate_up[:, :inter], expected, rtol=2e-6 if dtype == torch.float32 else 0,
                               atol=torch.finfo(dtype).tiny, equal_nan=True)
    assert torch.equal(gate_up[:, inter:].double(), up)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("tokens,top_k,hidden", [(0, 2, 16), (1, 1, 1), (5, 3, 17), (9, 8, 64)])
def test_combine_rows_kernel(dtype, tokens, top_k, hidden):
    """combine_rows against an fp64 weighted sum of the gathered rows, rounded once."""
    generator = torch.Generator().manual_seed(tokens * top_k * hidden)
    y = torch.randn(tokens * top_k, hidden, generator=generator).to(dtype)
    positions = torch.randperm(tokens * top_k, generator=generator).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=generator)
    out = torch.full((tokens, hidden), 7.0, dtype=dtype)
    _extension_or_fail().combine_rows(y, positions, weights, out)
    expected = (y.double()[positions] * weights.double()[..., None]).sum(1).to(dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 0  # 16-bit: exact after the one rounding
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=tolerance)


def test_combine_rows_refuses_positions_outside_y():
    y = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="position 4 is not a row of y"):
        _extension_or_fail().combine_rows(y, torch.tensor([[0, 4]]), torch.ones(1, 2), torch.empty(1, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_cpu_path_without_the_extension(case, dtype, monkeypatch):
    """Without moefuse._C the CPU path runs on torch ops alone (torch.mm, SiLU, index_put_)."""
    from moefuse.ops import grouped_moe_cpu

    monkeypatch.setattr(grouped_moe_cpu, "_extension", lambda: None)
    problem = [t.cpu() for t in _problem(case, dtype, seed=2)]
    assert_moe_close(grouped_moe(*problem, backend="cpu"), grouped_moe_reference(*problem), ulps=3)


def test_cpu_path_with_transposed_expert_weights():
    """Weights stored [E, H, 2I] (transformers' is_transposed layout) are read through strided
    views: the extension's kernels decline them and torch.mm runs."""
    x, gate_up, down, ids, weights = [t.cpu() for t in _problem(CASES[1], torch.float32)]
    strided = [w.transpose(1, 2).contiguous().transpose(1, 2) for w in (gate_up, down)]
    assert_moe_close(grouped_moe(x, *strided, ids, weights, backend="cpu"),
                     grouped_moe_reference(x, gate_up, down, ids, weights), ulps=3)


@pytest.mark.parametrize("case", CASES[:4], ids=CASE_IDS[:4])
def test_reference_matches_transformers_experts(case):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    tokens, experts, top_k, hidden, inter, _ = case
    x, gate_up, down, ids, weights = [t.cpu() for t in _problem(case, torch.float32)]
    config = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
    config._experts_implementation = "eager"
    module = MixtralExperts(config)
    with torch.no_grad():
        module.gate_up_proj.copy_(gate_up)
        module.down_proj.copy_(down)
        expected = module(x, ids, weights)
    torch.testing.assert_close(grouped_moe_reference(x, gate_up, down, ids, weights), expected, rtol=1e-5, atol=1e-6)


FAMILY_BLOCKS = {
    "mixtral": ("MixtralConfig", "mixtral.modeling_mixtral.MixtralSparseMoeBlock",
                dict(intermediate_size=36, num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
                  dict(moe_intermediate_size=20, shared_expert_intermediate_size=28, num_experts=12,
                       num_experts_per_tok=4, norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
                  dict(moe_intermediate_size=20, num_experts=16, num_experts_per_tok=3, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "olmoe.modeling_olmoe.OlmoeSparseMoeBlock",
              dict(intermediate_size=44, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
}


def _family_block(family, hidden, dtype):
    import importlib

    import transformers

    config_name, path, sizes = FAMILY_BLOCKS[family]
    module_path, cls = path.rsplit(".", 1)
    config = getattr(transformers, config_name)(hidden_size=hidden, **sizes)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    block = getattr(importlib.import_module(f"transformers.models.{module_path}"), cls)(config)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, hidden ** -0.5)
    return block.to(DEVICE, dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("tokens", [1, 3, 45])
@pytest.mark.parametrize("family", sorted(FAMILY_BLOCKS))
@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_patched_block_matches_transformers(family, tokens, dtype, backend):
    from moefuse.integrations.transformers import apply_to

    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the CPU path runs on CPU tensors")
    block = _family_block(family, 40, dtype)
    x = torch.randn(1, tokens, 40, generator=torch.Generator().manual_seed(tokens)).to(DEVICE, dtype)
    with torch.no_grad():
        expected = block(x)
        apply_to(block, backend=backend)
        actual = block(x)
    # transformers rounds each expert's output (and, in 16-bit, the running sum) to the dtype.
    assert_moe_close(actual, expected, ulps=4 * block.gate.top_k)


def test_align_worked_example():
    ids = torch.tensor([[1, 0], [1, 2]], device=DEVICE)
    sorted_ids, block_experts, num_padded = moe_align.align_forward(ids, 3, 2)
    assert num_padded.item() == 6
    assert sorted_ids[:6].tolist() == [1, 4, 0, 2, 3, 4]
    assert block_experts.tolist() == [0, 1, 2] + [-1] * (block_experts.numel() - 3)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 8, 2, 16), (5, 3, 3, 4), (70, 16, 4, 16),
                                                          (300, 8, 2, 16), (2, 1, 1, 16), (600, 130, 3, 8)])
def test_align_matches_stable_sort(tokens, experts, top_k, block_m):
    generator = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, experts, (tokens, top_k), generator=generator).to(DEVICE)
    sorted_ids, block_experts, num_padded = moe_align.align_forward(ids, experts, block_m)
    want_ids, want_blocks, want_padded = align_reference(ids.cpu(), experts, block_m)
    assert num_padded.item() == want_padded
    assert torch.equal(sorted_ids[:want_padded].cpu(), want_ids)
    assert (sorted_ids[want_padded:] == tokens * top_k).all()
    blocks = want_padded // block_m
    assert torch.equal(block_experts[:blocks].cpu(), want_blocks)
    assert (block_experts[blocks:] == -1).all()


@pytest.mark.parametrize("softmax_after_topk,renormalize", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (13, 60, 4), (5, 3, 3), (70, 128, 8)])
def test_route_kernel_matches_reference(tokens, experts, top_k, softmax_after_topk, renormalize):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts)).to(DEVICE)
    weights, ids = moe_routing.route_forward(logits, top_k, softmax_after_topk, renormalize)
    want_weights, want_ids = route_reference(logits, top_k, softmax_after_topk=softmax_after_topk,
                                             renormalize=renormalize)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-5, atol=1e-7)


def test_route_reference_matches_transformers_routers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    x = torch.randn(9, 16)
    for router, renormalize in (
        (MixtralTopKRouter(MixtralConfig(hidden_size=16, num_local_experts=8, num_experts_per_tok=2)), True),
        (Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=16, num_experts=12, num_experts_per_tok=3,
                                           norm_topk_prob=False)), False),
    ):
        torch.nn.init.normal_(router.weight)
        with torch.no_grad():
            logits, want_weights, want_ids = router(x)
        weights, ids = route(logits, router.top_k, renormalize=renormalize)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(weights, want_weights.float())


def test_grad_falls_back_to_the_differentiable_reference():
    x, gate_up, down, ids, weights = [t.cpu() for t in _problem(CASES[2], torch.float32)]
    leaves = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
    out = grouped_moe(leaves[0], leaves[1], leaves[2], ids, leaves[3])
    out.square().sum().backward()
    clones = [t.clone().requires_grad_() for t in (x, gate_up, down, weights)]
    grouped_moe_reference(clones[0], clones[1], clones[2], ids, clones[3]).square().sum().backward()
    for leaf, clone in zip(leaves, clones):
        torch.testing.assert_close(leaf.grad, clone.grad)


def test_empty_batch():
    x, gate_up, down, ids, weights = _problem(CASES[0], torch.float32)
    out = grouped_moe(x[:0], gate_up, down, ids[:0], weights[:0], backend="triton")
    assert out.shape == (0, x.shape[1])


@pytest.mark.parametrize("mutate,match", [
    (lambda p: (p[0][None],) + p[1:], "hidden must be"),
    (lambda p: (p[0].double(),) + p[1:], "dtype"),
    (lambda p: (p[0], p[1][:, :-1]) + p[2:], "gate_up_proj must be"),
    (lambda p: p[:2] + (p[2][:, :, :-1],) + p[3:], "down_proj must be"),
    (lambda p: p[:3] + (p[3] + 100,) + p[4:], "outside"),
    (lambda p: p[:4] + (p[4][:, :1],), "topk_weights"),
    (lambda p: (p[0], p[1].half()) + p[2:], "convert"),
])
def test_bad_inputs_are_named(mutate, match):
    problem = mutate(_problem(CASES[0], torch.float32))
    with pytest.raises(MoeInputError, match=match):
        grouped_moe(*problem)


def test_unknown_backend():
    with pytest.raises(MoeInputError, match="backend"):
        grouped_moe(*_problem(CASES[0], torch.float32), backend="fastest")


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_nonfinite_token_stays_in_its_row(backend):
    problem = list(_problem(CASES[2], torch.float32))
    if backend == "cpu":
        problem = [t.cpu() for t in problem]
    problem[0] = problem[0].clone()
    problem[0][5, 3] = float("nan")
    problem[0][9, 0] = float("inf")
    out = grouped_moe(*problem, backend=backend)
    bad = ~torch.isfinite(out).all(dim=1)
    assert bad.nonzero().reshape(-1).tolist() == [5, 9]
    expected = grouped_moe_reference(*problem)
    assert_moe_close(out[~bad], expected[~bad])


def test_triton_op_registration():
    x, gate_up, down, ids, weights = _problem(CASES[0], torch.float32)
    torch.library.opcheck(torch.ops.moefuse.grouped_moe_triton, (x, gate_up, down, ids, weights, False),
                          test_utils=("test_schema", "test_faketensor"))
