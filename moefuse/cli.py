"""The `moefuse` command line; every command is a thin call into the Python API."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from moefuse.errors import MoefuseError


def _print_written(result, args: argparse.Namespace) -> None:
    """A dry run prints its plan; a run prints where it wrote (unless --quiet)."""
    if getattr(args, "dry_run", False):
        print(result)
    elif not args.quiet:
        print(f"wrote {result}")


def _merge(args: argparse.Namespace) -> None:
    _idle_threads_sleep(args.config)
    from moefuse.merge import merge_checkpoints

    gc.freeze()  # the merge allocates many small objects; spare the collector torch's ones

    _print_written(merge_checkpoints(
        args.config, args.out_dir, device=args.device, backend=args.backend, max_shard_size=args.max_shard_size,
        progress=not args.quiet, overwrite=args.overwrite, dry_run=args.dry_run, direct_io=not args.buffered_output,
        allow_nonfinite=args.allow_nonfinite,
    ), args)


# The merges run as torch operations on small chunks (`MethodSpec.runs_torch_operations`) make
# thousands of short parallel regions: a wake-up per region costs more than the work (SCE of
# SmolLM2-135M, 2 cores: 24.4 s with sleeping threads, 8.6 s when they spin 30000 rounds first).
SHORT_SPIN = "30000"


def _idle_threads_sleep(config_path: Optional[str] = None) -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose a policy). A CPU
    merge alternates OpenMP regions with Python and a writer thread; spinning threads took a quarter
    of the CPU time of a 2-core merge from the threads doing the work. For the torch-operation
    methods they spin briefly before sleeping (GOMP_SPINCOUNT). Only effective before torch is
    imported, which is why `import moefuse` does not import it."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    if _runs_torch_operations(config_path):
        os.environ["GOMP_SPINCOUNT"] = SHORT_SPIN  # GNU OpenMP's, which torch's Linux wheels use
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def _runs_torch_operations(config_path: Optional[str]) -> bool:
    """Whether the YAML config names a torch-operation merge; False when it cannot be read (the
    merge itself then reports the problem)."""
    import yaml  # not moefuse.merge.config: that imports torch, which must start after the policy is set

    from moefuse.methods import get_method  # imports no torch

    if config_path is None or not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(data, dict):
        return False
    method = data.get("merge_method")
    try:
        spec = get_method(method) if isinstance(method, str) else None
    except MoefuseError:
        spec = None
    if spec is None:
        return False
    parameters = data.get("parameters")
    return spec.runs_torch_operations(parameters if isinstance(parameters, dict) else {})


def _build_moe(args: argparse.Namespace) -> None:
    from moefuse.moe.build import build_moe

    _print_written(build_moe(args.config, args.out_dir, max_shard_size=args.max_shard_size, progress=not args.quiet,
                             overwrite=args.overwrite, dry_run=args.dry_run), args)


def _training(load_trainer: Callable[[], Callable]) -> Callable[[argparse.Namespace], None]:
    """The command running the trainer `load_trainer()` returns (train_router or train_moe)."""
    def run(args: argparse.Namespace) -> None:
        if args.quiet:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its "Loading weights" bar
        result = load_trainer()(args.model, args.text, args.out_dir, steps=args.steps, learning_rate=args.lr,
                                seq_len=args.seq_len, batch_size=args.batch_size, train=args.train,
                                aux_loss_coef=args.aux_loss_coef, device=args.device, seed=args.seed,
                                progress=not args.quiet, overwrite=args.overwrite)
        if not args.quiet:
            print(f"wrote {result.out_dir}: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} "
                  f"({result.trained_parameters} parameters trained)")
    return run


def _train_router_function():
    from moefuse.moe.train_router import train_router
    return train_router


def _train_moe_function():
    from moefuse.moe.train import train_moe
    return train_moe


def _methods(args: argparse.Namespace) -> None:
    from moefuse.methods import all_methods

    for spec in all_methods():
        params = ", ".join(f"{p.name}={p.default!r}" for p in spec.params)
        print(f"{spec.name:18s} {params}")


def _generate(args: argparse.Namespace) -> None:
    from moefuse.generate import generate

    print(generate(args.model, args.prompt, max_new_tokens=args.max_new_tokens, fast=args.fast,
                   device=args.device, dtype=args.dtype))


def _compress_moe(args: argparse.Namespace) -> None:
    from moefuse.moe.compress import compress_moe

    out = compress_moe(args.model, args.out_dir, args.experts, calibration_text=args.calibration,
                       max_tokens=args.max_tokens, seq_len=args.seq_len, overwrite=args.overwrite)
    print(f"wrote {out}")


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and expected memory, write nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_training_options(parser: argparse.ArgumentParser, text_help: str, seq_len_help: str) -> None:
    parser.add_argument("text", help=text_help)
    parser.add_argument("out_dir", help="output folder (written atomically)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128, help=seq_len_help)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moefuse", description="Fast, memory-frugal model merging.")
    commands = parser.add_subparsers(dest="command", required=True)

    merge = commands.add_parser("merge", help="merge checkpoints described by a mergekit-style YAML file")
    merge.add_argument("config", help="merge configuration (YAML)")
    merge.add_argument("out_dir", help="output folder (written atomically)")
    merge.add_argument("--device", default="cpu", help="cpu or cuda (Triton kernels)")
    merge.add_argument("--backend", default="auto", choices=["auto", "triton", "cpu", "reference"])
    _add_output_options(merge)
    merge.add_argument("--buffered-output", action="store_true",
                       help="write the output through the page cache (default: O_DIRECT where the file system allows)")
    merge.add_argument("--allow-nonfinite", action="store_true",
                       help="merge inputs holding NaN/Inf as they are (default: refuse them, naming tensor and model)")
    merge.set_defaults(run=_merge)

    build = commands.add_parser("build-moe", help="build a mixture of experts from dense models (mergekit-moe YAML)")
    build.add_argument("config", help="MoE configuration (YAML; mergekit-moe keys plus moefuse's)")
    build.add_argument("out_dir", help="output folder (written atomically)")
    _add_output_options(build)
    build.set_defaults(run=_build_moe)

    trainer = commands.add_parser("train-router", help="fine-tune the routers of an MoE on a local text file")
    trainer.add_argument("model", help="MoE checkpoint folder (Mixtral, Qwen2-MoE or Qwen3-MoE layout)")
    _add_training_options(trainer, "UTF-8 text file to train on", "longest training window")
    trainer.add_argument("--train", default="gates", choices=["gates", "experts", "all"],
                         help="what to train: the routers, routers and experts, or everything")
    trainer.add_argument("--aux-loss-coef", type=float, default=0.02, help="weight of the load-balancing loss")
    trainer.set_defaults(run=_training(_train_router_function))

    tuner = commands.add_parser("train", help="fine-tune a heterogeneous MoE (router, projectors) on a local text file")
    tuner.add_argument("model", help="heterogeneous MoE folder (moefuse_hetero, from build-moe with mode: heterogeneous)")
    _add_training_options(tuner, "UTF-8 text file to train on (one sample per line)", "longest sample; longer lines are cut")
    tuner.add_argument("--train", default="projectors", choices=["router", "projectors", "all"],
                       help="what to train: the router, the router and projectors, or everything")
    tuner.add_argument("--aux-loss-coef", type=float, help="weight of the load-balancing loss (default: the config's)")
    tuner.set_defaults(run=_training(_train_moe_function))

    methods = commands.add_parser("methods", help="list merge methods and their parameters")
    methods.set_defaults(run=_methods)

    generate = commands.add_parser("generate", help="greedy generation with the fast MoE blocks patched in")
    generate.add_argument("model", help="model folder (config, weights, tokenizer)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                          help="run the sparse MoE blocks on moefuse's grouped kernels; --fast fails on a model "
                               "without them (default: patch where the model has them)")
    generate.add_argument("--device", default="cpu", help="cpu or cuda")
    generate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the checkpoint's")
    generate.set_defaults(run=_generate)

    compress = commands.add_parser("compress-moe", help="merge an MoE's experts into fewer (M-SMoE style)")
    compress.add_argument("model", help="MoE checkpoint folder (Mixtral, Qwen2-MoE, Qwen3-MoE)")
    compress.add_argument("out_dir", help="output folder (written atomically)")
    compress.add_argument("--experts", type=int, required=True, help="experts per layer to keep")
    compress.add_argument("--calibration", required=True, help="local text file for routing statistics")
    compress.add_argument("--max-tokens", type=int, default=8192, help="calibration tokens to use")
    compress.add_argument("--seq-len", type=int, default=512, help="calibration sequence length")
    compress.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    compress.set_defaults(run=_compress_moe)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that partial outputs are removed on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command. Exit status: 0 done, 2 bad input (the message says what to fix),
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted command leaves no output."""
    args = build_parser().parse_args(argv)
    with _sigterm_raises():
        return _run(args)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises _Terminated (where signals can be handled: the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _run(args: argparse.Namespace) -> int:
    try:
        args.run(args)
    except MoefuseError as error:
        print(f"moefuse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moefuse: interrupted; no output was written", file=sys.stderr)
        return 130
    except _Terminated:
        print("moefuse: terminated; no output was written", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
