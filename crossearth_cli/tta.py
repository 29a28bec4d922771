"""Test-time augmentation: the model also sees each tile flipped (and turned), and the scores,
turned back, are averaged.

Overhead imagery has no "up": a roof or a road seen mirrored or turned by 90° is still one, so
averaging the views evens out the model's orientation quirks, at one forward pass per view.
Off by default: the paper's numbers are for one view. Views run one after another, not
stacked into one batch, so the model's memory per tile (and ``--batch-size auto``) does not
change, and turned views of an oblong tile need no padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crossearth_cli.errors import ConfigError

__all__ = ["TTA_MODES", "check_mode", "views", "averaged_scores"]

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]

TTA_MODES = ("none", "flip", "d4")  # 1, 4 and 8 views


def check_mode(mode: str) -> None:
    if mode not in TTA_MODES:
        raise ConfigError(f"--tta {mode!r}: use one of {', '.join(TTA_MODES)}")


def _view(k: int, mirror: bool) -> View:
    """Mirror left-right (if ``mirror``), then turn by ``k`` quarter turns; and the way back."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x.flip(-1) if mirror else x
        # contiguous: the model's fast paths (the patch GEMM on CUDA) expect a plain layout
        return torch.rot90(y, k, dims=(-2, -1)).contiguous() if k else y

    def back(s: torch.Tensor) -> torch.Tensor:
        y = torch.rot90(s, -k, dims=(-2, -1)) if k else s
        return y.flip(-1) if mirror else y

    return forward, back


def views(mode: str) -> list[View]:
    """``none``: the tile as it is; ``flip``: also mirrored left-right, up-down and both (4);
    ``d4``: every mirror and quarter turn of the square (8)."""
    if mode == "none":
        return [_view(0, False)]
    if mode == "flip":  # up-down = left-right mirror turned by a half turn
        return [_view(0, False), _view(0, True), _view(2, True), _view(2, False)]
    if mode == "d4":
        return [_view(k, mirror) for mirror in (False, True) for k in range(4)]
    raise ValueError(f"unknown test-time augmentation {mode!r}")


def averaged_scores(net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """The mean over ``mode``'s views of ``net``'s scores (B×C×H×W), each turned back."""
    if mode == "none":
        return net(x)
    total = None
    all_views = views(mode)
    for forward, back in all_views:
        scores = back(net(forward(x)))
        if total is None:  # a copy: a CUDA graph's output buffer is rewritten by the next view
            total = scores.to(torch.float32, copy=True)
        else:
            total.add_(scores)
    return total.div_(len(all_views))
