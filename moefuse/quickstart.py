"""Quickstart: `python -m moefuse.quickstart [--numel N] [--models K] [--method ties]`.

Merges K synthetic fine-tunes of one tensor on the fastest local backend, checks the result
against the plain-PyTorch reference on a slice, and prints the time and bandwidth.
"""

from __future__ import annotations

import argparse
import time

import torch

import moefuse

EXAMPLE_PARAMS = {
    "linear": {}, "passthrough": {}, "model_stock": {}, "karcher": {}, "slerp": {"t": 0.5}, "nearswap": {"t": 0.005},
    "nuslerp": {"weight": [0.5, 0.5]}, "multislerp": {"weight": 1.0}, "sce": {"select_topk": 0.3},
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=16 << 20)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--method", default="ties", choices=moefuse.method_names())
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(args.numel, generator=generator).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(args.numel, generator=generator)).to(dtype) for _ in range(args.models)]
    base, models = base.to(device), [m.to(device) for m in models]
    params = EXAMPLE_PARAMS.get(args.method, {"density": 0.3})  # density: the task-arithmetic family
    spec = moefuse.get_method(args.method)
    models = models[:spec.max_models] if spec.max_models else models
    use_base = base if spec.uses_base else None

    moefuse.merge_tensors(use_base, models, args.method, **params)  # warm-up
    start = time.perf_counter()
    merged = moefuse.merge_tensors(use_base, models, args.method, **params)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    # The reference allocates several copies of its inputs: check on the first 64k entries.
    head = slice(0, min(args.numel, 1 << 16))
    small_base = None if use_base is None else base[head]
    small_models = [m[head] for m in models]
    fast = moefuse.merge_tensors(small_base, small_models, args.method, **params)
    slow = moefuse.merge_tensors(small_base, small_models, args.method, backend="reference", **params)
    tolerance = 1e-5 if dtype == torch.float32 else 2.0 ** -7  # fp32, or one 16-bit ulp
    torch.testing.assert_close(fast.float(), slow.float(), rtol=tolerance, atol=tolerance * slow.abs().max().item())
    moved = (len(models) + 2) * base.numel() * base.element_size()
    print(
        f"{args.method}: {len(models)} models x {args.numel:,} {args.dtype} entries on {device} "
        f"in {seconds * 1e3:.1f} ms ({moved / seconds / 1e9:.2f} GB/s); "
        f"output mean {merged.float().mean().item():+.5f}"
    )


if __name__ == "__main__":
    main()
