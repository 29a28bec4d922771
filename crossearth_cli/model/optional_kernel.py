"""Triton fast paths that a run can do without.

Each is imported on first use (CPU runs never import Triton), can be switched off with an
environment variable set to ``0``, and is given up for the rest of the process, with one
warning, if it cannot compile or launch here (no C compiler for Triton's launcher, an
unwritable cache, an unsupported GPU...). Out-of-memory errors are not such a failure: they
propagate, so that the batch can be halved.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings

import torch

from crossearth_cli.errors import is_out_of_memory

__all__ = ["OptionalKernel", "on_triton", "env_set"]


def on_triton(x: torch.Tensor) -> bool:
    """Where the kernels run: CUDA tensors (or Triton's interpreter, which the tests use), no
    gradient being recorded (they have no backward pass), and not while ``torch.compile``
    traces (it fuses these passes itself)."""
    return ((x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling())


@contextlib.contextmanager
def env_set(name: str, value: str):
    """The environment variable ``name`` set to ``value`` while inside, then as it was."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


class OptionalKernel:
    """``module.attr``, called through :meth:`call`, which answers None where the eager path
    must run instead."""

    def __init__(self, what: str, module: str, attr: str, env: str):
        self.what, self.module, self.attr, self.env = what, module, attr, env
        self.failed: list[str] = []  # why it failed in this process, once it has
        self._loaded: tuple | None = None

    def load(self):
        """The function, or None without a working Triton."""
        if self._loaded is None:
            try:
                self._loaded = (getattr(importlib.import_module(self.module), self.attr),)
            except Exception:  # noqa: BLE001 - no Triton (or a broken one): the eager path
                self._loaded = (None,)
        return self._loaded[0]

    def switched_off(self):
        """The eager path while inside (the environment variable set to 0), for comparisons."""
        return env_set(self.env, "0")

    def enabled(self) -> bool:
        return not self.failed and os.environ.get(self.env) != "0"

    def call(self, *args):
        fn = self.load() if self.enabled() else None
        if fn is None:
            return None
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001 - any failure but OOM: the eager path
            if is_out_of_memory(exc):
                raise
            self.failed.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"{self.what} unavailable ({self.failed[0][:200]}); using the eager "
                          "path", RuntimeWarning, stacklevel=3)
            return None
