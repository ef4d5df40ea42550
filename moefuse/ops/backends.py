"""Lazy loading of the fast merge backends, so `import moefuse` never needs a GPU or a build."""

from __future__ import annotations

import functools
import warnings

from moefuse.errors import MergeConfigError


@functools.lru_cache(maxsize=None)
def _load_cpu():
    try:
        from moefuse.ops import merge_cpu
    except ImportError as error:  # the extension was not built
        return None, str(error)
    return merge_cpu, ""


def cpu_unavailable_reason() -> str:
    return _load_cpu()[1]


_warned = False


def cpu_backend(warn_if_missing: bool):
    """The C++ CPU backend module, or None (with one warning) when the extension is missing."""
    global _warned
    module, reason = _load_cpu()
    if module is None and warn_if_missing and not _warned:
        _warned = True
        warnings.warn(
            f"moefuse: the C++ extension is unavailable ({reason}); CPU merges use the slow "
            "reference path. Reinstall with the README's setup command to build it.",
            stacklevel=3,
        )
    return module


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        from moefuse.ops import merge_triton
    except ImportError as error:
        return None, str(error)
    return merge_triton, ""


def triton_backend():
    """The Triton backend module; raises when Triton cannot be imported."""
    module, reason = _load_triton()
    if module is None:
        raise MergeConfigError(f"the Triton backend is unavailable: {reason}; install triton")
    return module


def available(name: str) -> bool:
    """Whether backend `name` can be loaded here ("cpu" or "triton")."""
    loader = {"cpu": _load_cpu, "triton": _load_triton}[name]
    return loader()[0] is not None
