"""One place that picks the attention kernel.

PyTorch's ``scaled_dot_product_attention`` by default (flash / memory-efficient kernels on CUDA,
a fused kernel on CPU). xformers' ``memory_efficient_attention`` is used only when it is
importable *and* the tensors live on CUDA and there is no mask: that is the case the original
code ran it in (the ViT blocks), and it gives the same numbers up to rounding. Not while
``torch.compile`` traces: SDPA is what dynamo and inductor know.

``CROSSEARTH_SDPA=cudnn`` puts cuDNN's attention kernels first in SDPA's choice on CUDA (SDPA
tries flash first; others found cuDNN's 1.7-2.3x faster on Hopper for training shapes, and
slower elsewhere). Opt-in until ``benchmarks/gpu_explore.py`` has timed it on our shapes.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F

__all__ = ["attention", "use_xformers", "xformers_available", "SDPA_ENV"]

SDPA_ENV = "CROSSEARTH_SDPA"  # "cudnn": SDPA tries cuDNN's kernels first on CUDA


@functools.lru_cache(maxsize=1)
def _xformers_ops():
    try:
        import xformers.ops as xops  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return xops


def xformers_available() -> bool:
    return _xformers_ops() is not None


def use_xformers(q, allowed) -> bool:
    """xformers for this call: installed, CUDA tensors, no mask, not being compiled."""
    return (allowed is None and q.is_cuda and not torch.compiler.is_compiling()
            and xformers_available())


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over heads.

    q: B×h×Nq×d, k: B×h×Nk×d, v: B×h×Nk×dv -> B×h×Nq×dv.
    ``allowed``: optional boolean mask broadcastable to B×h×Nq×Nk, **True = may attend** (SDPA
    convention; callers holding an mmdet-style "True = blocked" mask must invert it).
    ``scale`` defaults to d**-0.5.
    """
    if use_xformers(q, allowed):  # xformers wants B×N×h×d
        out = _xformers_ops().memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2)
    if _prefer_cudnn(q):
        with _cudnn_first():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


def _prefer_cudnn(q: torch.Tensor) -> bool:
    """cuDNN first for this call: asked for, CUDA tensors, not while dynamo traces (asked
    first, so that a traced forward never reads the environment)."""
    return (not torch.compiler.is_compiling() and q.is_cuda
            and os.environ.get(SDPA_ENV, "").lower() == "cudnn")


def _cudnn_first():
    """SDPA's order with cuDNN first; a shape it cannot serve falls to the next kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch whose sdpa_kernel takes no priority: SDPA's own order
        return contextlib.nullcontext()
