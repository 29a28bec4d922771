"""Multi-scale deformable attention in pure PyTorch (mmcv ``MultiScaleDeformableAttention``).

Each query looks at a few learned points around its reference point on every level; the value
at each point is read with bilinear ``grid_sample`` (zero padding, align_corners=False) and the
points are mixed with softmaxed weights. The CUDA kernel of the original gives the same numbers
up to rounding. Sampling always runs in float32: bf16 locations would be off by whole pixels.

Layout: everything is kept "queries last" (…×S), so every elementwise step, the softmax over
the level-point pairs and ``grid_sample`` itself run along the long query axis. With the
natural B×S×h×L×P layout those steps run along axes of 2 to 12 elements, which on a CPU made
the whole attention 3× slower (docs/performance.md, "Deformable attention layout").

On CUDA the sampling and weighted sum run as one Triton kernel (``msda_triton``) when Triton
imports and the head width is a power of two: 2.3× faster on an H100. Set
``CROSSEARTH_DEFORM_ATTN=pytorch`` to keep the PyTorch path there. A kernel that fails to
compile or launch falls back to the PyTorch path for the rest of the process, with a warning.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from crossearth_cli.errors import is_out_of_memory

__all__ = ["MSDeformAttn", "ms_deform_attn_core", "fused_kernel"]

KERNEL_ENV = "CROSSEARTH_DEFORM_ATTN"  # "pytorch" keeps the PyTorch path on CUDA too


_IMPORTED: list = []  # [msda_fused or None] once tried (a plain list: dynamo traces it)


def _import_fused():
    if not _IMPORTED:
        try:
            from crossearth_cli.model.msda_triton import msda_fused
        except Exception:  # noqa: BLE001 - no Triton (or a broken one): the PyTorch path
            msda_fused = None
        _IMPORTED.append(msda_fused)
    return _IMPORTED[0]


_FUSED_FAILED: list[str] = []  # why the kernel failed in this process, once it has


def fused_kernel(head_width: int):
    """The Triton sampler if this head width can use it here, else None."""
    if (_FUSED_FAILED or os.environ.get(KERNEL_ENV, "").lower() == "pytorch"
            or head_width & (head_width - 1)):
        return None
    return _import_fused()


def _give_up_fused(exc: Exception) -> None:
    """A kernel that cannot compile or launch here (no C compiler for Triton's launcher, an
    unwritable cache, an unsupported GPU...) must not stop a run: note it once and use the
    PyTorch path from then on. Out-of-memory errors are not this: the caller re-raises them
    so the batch can be halved."""
    _FUSED_FAILED.append(f"{type(exc).__name__}: {exc}")
    warnings.warn(f"fused deformable attention unavailable ({_FUSED_FAILED[0][:200]}); "
                  "using the PyTorch path", RuntimeWarning, stacklevel=3)


def ms_deform_attn_core(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    grids: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """The sampling and weighted sum, one head per batch entry (N = B·h).

    value: N×d×S, S = Σ H_l·W_l, levels flattened row-major in ``spatial_shapes`` order.
    grids: L×N×P×Q×2, Q queries' sampling points (x, y) in grid_sample units ([-1, 1] = the
    outer cell edges).
    weights: N×L×P×Q, already softmaxed over the L·P pairs of each query.
    -> N×d×Q float32.
    """
    n, d, _ = value.shape
    value = value.float()
    out = None
    start = 0
    for lvl, (hl, wl) in enumerate(spatial_shapes):
        v = value[:, :, start : start + hl * wl].reshape(n, d, hl, wl)
        start += hl * wl
        samples = F.grid_sample(
            v, grids[lvl].float(), mode="bilinear", padding_mode="zeros", align_corners=False
        )  # N×d×P×S
        for p in range(samples.shape[2]):
            w = weights[:, lvl, p, None].float()  # N×1×S
            if out is None:
                out = samples[:, :, p] * w
            else:
                out.addcmul_(samples[:, :, p], w)
    return out


@functools.cache  # never dropped: a CUDA graph may read it
def _offset_scale(shapes: tuple[tuple[int, int], ...], heads: int, points: int,
                  device: torch.device) -> torch.Tensor:
    """2/size per offset row (heads→levels→points→xy), made once per level layout and device:
    building it from a Python list at every call is a host-to-device copy that makes the CPU
    wait for the GPU, six times per forward."""
    with torch.inference_mode(False):  # a normal tensor, usable with autograd on too
        size = torch.tensor([[wl, hl] for hl, wl in shapes], dtype=torch.float32)  # L×2 (x, y)
        scale = (2.0 / size).view(1, len(shapes), 1, 2).expand(heads, len(shapes), points, 2)
        return scale.reshape(-1).to(device)


def _project(linear: nn.Linear, x_t: torch.Tensor, scale: torch.Tensor | None = None):
    """``linear`` applied to B×C×S columns -> B×N×S (rows optionally scaled by ``scale``)."""
    weight, bias = linear.weight, linear.bias
    if scale is not None:
        weight, bias = weight * scale[:, None], bias * scale
    return torch.matmul(weight, x_t).add_(bias[:, None].to(weight.dtype))


class MSDeformAttn(nn.Module):
    """Deformable self-attention over the flattened levels, with the residual (mmcv layout)."""

    def __init__(self, embed_dims: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)

    def sampling(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each query looks and how much each point counts, both float32:
        weights (B·h)×L×P×S (softmaxed over each head's L·P pairs) and points B×h×L×P×2×S
        in grid_sample units."""
        return self.sampling_t((query + query_pos).transpose(1, 2), reference_points,
                               spatial_shapes)

    def sampling_t(
        self,
        q_t: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sampling` given the queries with their positions, as B×C×S columns."""
        b, _, s = q_t.shape
        h, nl, npts = self.num_heads, self.num_levels, self.num_points

        # weights: softmax along dim 2 by hand (torch's softmax over a last axis of 12 is
        # several times slower on the CPU)
        logits = _project(self.attention_weights, q_t).float().view(b, h, nl * npts, s)
        w = logits.sub_(logits.amax(2, keepdim=True)).exp_()
        w = w.div_(w.sum(2, keepdim=True)).view(b * h, nl, npts, s)

        # points: reference + offset in cells of each level; in grid_sample units the offset
        # is scaled by 2/size, folded into the projection (rows ordered heads→levels→points→xy)
        offset_scale = _offset_scale.__wrapped__ if torch.compiler.is_compiling() else _offset_scale
        scale = offset_scale(tuple(spatial_shapes), h, npts, q_t.device)  # (a constant to dynamo)
        off = _project(self.sampling_offsets, q_t, scale).float().view(b, h, nl, npts, 2, s)
        ref = reference_points.float().permute(0, 2, 3, 1) * 2 - 1  # (1|B)×L×2×S
        return w, off.add_(ref[:, None, :, None])

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        reference_points: torch.Tensor,
        spatial_shapes: list[tuple[int, int]],
        fused: bool | None = None,
    ) -> torch.Tensor:
        """query: B×S×C (also the value, without position), query_pos: (1|B)×S×C,
        reference_points: (1|B)×S×L×2 normalised (x, y). -> B×S×C = query + attention.

        ``fused``: use the Triton kernel (None: on CUDA when available and no gradient is
        being recorded: the kernel has no backward pass)."""
        b, s, c = query.shape
        h, nl, npts = self.num_heads, self.num_levels, self.num_points
        w, points = self.sampling(query, query_pos, reference_points, spatial_shapes)
        if fused is None:  # (Triton is not even imported for CPU runs)
            fused = query.is_cuda and not torch.is_grad_enabled()
        kernel = fused_kernel(c // h) if fused else None
        if kernel is not None:
            value = self.value_proj(query)  # B×S×C: each head's channels contiguous
            try:
                out = kernel(value, spatial_shapes, points.view(b * h, nl, npts, 2, s), w, h)
            except Exception as exc:  # noqa: BLE001 - any failure but OOM: the PyTorch path
                if is_out_of_memory(exc):
                    raise
                _give_up_fused(exc)
            else:
                return query + self.output_proj(out.to(query.dtype))
        value = _project(self.value_proj, query.transpose(1, 2))  # B×(h·d)×S
        grids = points.permute(2, 0, 1, 3, 5, 4).reshape(nl, b * h, npts, s, 2)
        out = ms_deform_attn_core(value.view(b * h, c // h, s), spatial_shapes, grids, w)
        out = out.view(b, c, s).transpose(1, 2).to(query.dtype)  # B×S×C
        return query + self.output_proj(out)
