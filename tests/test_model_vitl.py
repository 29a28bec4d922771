"""One forward of the full ViT-L model at 512×512 on the CPU (slow: ~10-20 s on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from crossearth_cli.model import CrossEarth
from crossearth_cli.model.random_init import random_state_dict, vit_large_config


@pytest.mark.slow
def test_vit_large_forward_512_on_cpu():
    config = vit_large_config(num_classes=6, img_size=512)
    with torch.device("meta"):
        model = CrossEarth(config)
    model.load_state_dict(random_state_dict(config, seed=0), assign=True)
    model.eval()
    assert sum(p.numel() for p in model.parameters()) == 327_766_216
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        scores = model(x)
    assert scores.shape == (1, 6, 512, 512) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert scores.min() >= 0 and scores.max() <= 100
    assert scores.std() > 0
