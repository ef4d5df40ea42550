#!/usr/bin/env python
"""Run mergekit 0.1.5's own merge-method tests with moefuse enabled as mergekit's backend.

mergekit's wheel ships no tests, so this script downloads its source distribution
(`pip download mergekit==0.1.5 --no-binary :all: --no-deps`, or takes a local one with
--sdist), extracts `tests/` into a temporary directory and runs pytest there on the files about
merge methods, with a plugin (written next to them, loaded with -p) that calls
`moefuse.integrations.mergekit.enable()` when the session starts and reports how often mergekit
called moefuse.

The sdist's tests import helpers from `tests/common.py`, which the sdist does not contain.
The script writes a stand-in of its own (tiny random checkpoints, merge-and-check) so that
test_basic_merges.py and test_merge_dtypes.py can run. Tests that cannot pass by design
(checking mergekit's exact random draws, or internals moefuse replaces) are listed with the
reason in DESELECTED and deselected; for mergekit 0.1.5 there are none.

Usage:
    python scripts/run_mergekit_suite.py [--sdist FILE] [--backend NAME] [--all] [--keep]
                                         [-- PYTEST_ARGS]

Exit status: pytest's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Dict, List

MERGEKIT_VERSION = "0.1.5"

# The merge-method tests; all run offline on CPU in well under a minute (GPU cases skip
# themselves without CUDA). --all adds the rest of the sdist's tests (tokenizers, architectures,
# I/O, graph), which moefuse does not touch.
TEST_FILES = (
    "test_sparsify.py",
    "test_merge_method_regressions.py",
    "test_batched_merges.py",
    "test_merge_method_interface.py",
    "test_merge_dtypes.py",
    "test_basic_merges.py",
    "test_config_parameters.py",
)

# Test id -> why it cannot pass with moefuse as the backend. Empty for mergekit 0.1.5: no test
# compares a DARE/DELLA merge with torch.bernoulli's draws (test_sparsify.py checks
# mergekit.sparsify itself, which stays mergekit's), and the ones that seed torch and merge twice
# pass because moefuse takes its seeds from torch's generator.
DESELECTED: Dict[str, str] = {}

PLUGIN = '''\
"""pytest plugin: mergekit's tests with moefuse as its backend (written by run_mergekit_suite.py)."""

import collections

import moefuse.integrations.mergekit as backend
from moefuse.errors import MoefuseError

CALLS = collections.Counter()
DECLINED = collections.Counter()


def _counting(merge_tensors):
    def counted(base, tensors, method, **kwargs):
        CALLS[method] += 1
        try:
            return merge_tensors(base, tensors, method, **kwargs)
        except MoefuseError:
            DECLINED[method] += 1
            raise

    return counted


def pytest_sessionstart(session):
    backend.merge_tensors = _counting(backend.merge_tensors)
    backend.enable({backend_name!r})


def pytest_report_header(config):
    return "moefuse backend ({backend_name}) for: " + ", ".join(backend.covered_methods())


def pytest_terminal_summary(terminalreporter):
    write = terminalreporter.write_line
    terminalreporter.section("moefuse backend")
    outcomes = ("passed", "failed", "error", "skipped", "deselected")
    write(", ".join(f"{{len(terminalreporter.stats.get(o, []))}} {{o}}" for o in outcomes))
    write("moefuse.merge_tensors calls per method (of which declined, so run by mergekit):")
    for method in sorted(CALLS):
        write(f"  {{method}}: {{CALLS[method]}} ({{DECLINED[method]}})")
'''

COMMON = '''\
"""Stand-in for mergekit's tests/common.py, which its sdist lacks (written by run_mergekit_suite.py)."""

import os
import tempfile

import torch
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from mergekit.io import LazyTensorLoader
from mergekit.merge import run_merge
from mergekit.options import MergeOptions


def _save(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _text_config(cls, vocab_size=64):
    return cls(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_hidden_layers=2,
    )


def make_picollama(path, vocab_size=64):
    return _save(LlamaForCausalLM(_text_config(LlamaConfig, vocab_size)), path)


def make_picogranite(path):
    return _save(GraniteForCausalLM(_text_config(GraniteConfig)), path)


def make_gpt2size(path):
    """GPT-2's 12 layers at a tiny width."""
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=12, n_head=4, n_positions=64)
    return _save(GPT2LMHeadModel(config), path)


def make_picoLlaVa(path):
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        projection_dim=32,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=_text_config(LlamaConfig), image_token_index=10
    )
    return _save(LlavaForConditionalGeneration(config), path)


def run_and_check_merge(config, check_nan=True, validate=None, auto_arch=False):
    """Merge into a temporary directory; require a config and weights, no NaN, then validate().
    auto_arch: accepted; mergekit infers unknown architectures by itself."""
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        assert os.path.exists(os.path.join(out, "config.json")), "no config.json written"
        loader = LazyTensorLoader.from_disk(out)
        assert loader.index.tensor_paths, "no tensors written"
        if check_nan:
            for name in loader.index.tensor_paths:
                tensor = loader.get_tensor(name)
                assert not torch.isnan(tensor).any(), f"NaN in {name}"
        if validate is not None:
            validate(out)
'''


def main() -> int:
    """Fetch and extract mergekit's tests, run them with the moefuse plugin; pytest's exit code."""
    args = _parse_args()
    installed = importlib.metadata.version("mergekit")
    if installed != MERGEKIT_VERSION:
        print(f"mergekit {installed} is installed, this is {MERGEKIT_VERSION}'s suite", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="moefuse-mergekit-suite-"))
    try:
        suite = work / "suite"
        _extract_tests(Path(args.sdist) if args.sdist else _download_sdist(work), suite)
        (suite / "tests" / "__init__.py").touch()  # `tests.common` must resolve to this folder
        (suite / "tests" / "common.py").write_text(COMMON)
        (suite / "moefuse_backend_plugin.py").write_text(PLUGIN.format(backend_name=args.backend))
        (suite / "pytest.ini").write_text("[pytest]\n")  # keep pytest away from any outer config

        command = [sys.executable, "-m", "pytest", "-q", "-p", "moefuse_backend_plugin"]
        command += ["-p", "no:cacheprovider"]
        command += ["tests"] if args.all else [f"tests/{name}" for name in TEST_FILES]
        for test_id in DESELECTED:
            command += ["--deselect", test_id]
        command += args.pytest_args
        print("in", suite, "running:", " ".join(command[1:]), flush=True)
        code = subprocess.call(command, cwd=suite, env=_environment(suite))
    finally:
        if args.keep:
            print("kept:", work)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmergekit {MERGEKIT_VERSION}'s tests, moefuse backend {args.backend}: pytest exit code {code}")
    print("files:", "all of tests/" if args.all else ", ".join(TEST_FILES))
    print(f"deselected: {len(DESELECTED) or 'none'}")
    for test_id, reason in DESELECTED.items():
        print(f"  {test_id}: {reason}")
    return code


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdist", help=f"use this mergekit-{MERGEKIT_VERSION}.tar.gz, do not download")
    parser.add_argument(
        "--backend",
        default="auto",
        help="moefuse backend: auto, triton, cpu, reference (reference keeps whole-tensor copies, "
        "so mergekit's three peak-memory tests fail with it)",
    )
    parser.add_argument("--all", action="store_true", help="run every test file of the sdist")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: passed to pytest")
    args = parser.parse_args()
    if args.pytest_args[:1] == ["--"]:
        args.pytest_args = args.pytest_args[1:]
    return args


def _download_sdist(work: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", f"mergekit=={MERGEKIT_VERSION}",
         "--no-binary", ":all:", "--no-deps", "-d", str(work)],
        check=True,
    )
    return work / f"mergekit-{MERGEKIT_VERSION}.tar.gz"


def _extract_tests(sdist: Path, destination: Path) -> None:
    """Extract the sdist's top-level tests/ folder (only) into destination/tests."""
    prefix = f"mergekit-{MERGEKIT_VERSION}/"
    with tarfile.open(sdist) as archive:
        members: List[tarfile.TarInfo] = []
        for member in archive.getmembers():
            if member.name.startswith(prefix + "tests/"):
                member.name = member.name[len(prefix):]
                members.append(member)
        archive.extractall(destination, members=members, filter="data")


def _environment(suite: Path) -> Dict[str, str]:
    environment = dict(os.environ)
    # the suite's folder first (plugin, `tests` package); HF offline: nothing is downloaded
    paths = [str(suite), environment.get("PYTHONPATH")]
    environment["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
    environment.setdefault("HF_HUB_OFFLINE", "1")
    return environment


if __name__ == "__main__":
    sys.exit(main())
