"""The preset table is consistent, and fetching offline fails with the way out."""

from __future__ import annotations

import pytest

from crossearth_cli.errors import ConfigError, UserError
from crossearth_cli.presets import (
    BACKBONE_512,
    BACKBONE_1024,
    HF_REPO,
    PRESETS,
    fetch_weights,
    find_preset_for_file,
    get_preset,
    preset_names,
)

RELEASED = [  # issue 2 + reference §2
    "Potsdam(i)-source.pth",
    "Potsdam(r)-source.pth",
    "Vaihingen-source.pth",
    "WHU-Building-A2S.pth",
    "WHU-Building-S2A.pth",
    "Potsdam(r)2RescueNet.pth",
    "Potsdam(i)2RescueNet.pth",
    "casid-tem-source.pth",
    "casid-tms-source.pth",
    "casid-sub-source.pth",
    "casid-trf-source.pth",
    "D2M-Rein.pth",
]


def test_every_released_checkpoint_has_a_preset():
    assert sorted(p.file for p in PRESETS) == sorted(RELEASED)
    assert len(set(preset_names())) == len(PRESETS)
    assert HF_REPO == "Cusyoung/CrossEarth"


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_is_consistent(preset):
    assert preset.name == preset.name.lower() and " " not in preset.name
    assert len(preset.palette) == len(preset.classes) >= 2
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in preset.palette)
    assert preset.bands in ("RGB", "IRRG")
    assert (preset.crop_size, preset.stride, preset.backbone) in (
        (512, 341, BACKBONE_512),
        (1024, 683, BACKBONE_1024),
    )
    assert preset.gsd_m is None or 0.01 < preset.gsd_m < 5
    assert preset.repo_path.endswith(".pth")


def test_known_facts():
    assert get_preset("potsdam-irrg").bands == "IRRG"
    assert get_preset("potsdam-rgb").bands == "RGB"
    assert get_preset("vaihingen-irrg").classes[1] == "building"
    assert get_preset("casid-tem").crop_size == 1024
    assert get_preset("whu-building-a2s").label_note  # the §5 label doubt is recorded
    assert get_preset("Potsdam-IRRG").name == "potsdam-irrg"
    assert find_preset_for_file("/data/Potsdam(r)-source.pth").name == "potsdam-rgb"
    assert find_preset_for_file("mine.pth") is None


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ConfigError) as exc:
        get_preset("potsdam")
    line = exc.value.one_line()
    assert "unknown model 'potsdam'" in line and "potsdam-irrg" in line and "casid-trf" in line


def test_fetch_offline_says_how_to_pass_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(UserError) as exc:
        fetch_weights("potsdam-rgb", cache_dir=tmp_path)
    line = exc.value.one_line()
    assert "\n" not in line
    assert "Potsdam(r)-source.pth" in line and "--checkpoint PATH" in line


@pytest.mark.parametrize("resolves", [True, False], ids=["online", "no-dns"])
def test_without_a_network_only_the_local_cache_is_asked(tmp_path, monkeypatch, resolves):
    """Where the hub's host does not resolve, huggingface_hub is asked for the cached file
    only (it would otherwise retry for ~20 s); otherwise it may download."""
    import socket

    import huggingface_hub

    def getaddrinfo(host, port, *args, **kwargs):
        assert host == "huggingface.co"
        if not resolves:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    asked = {}

    def fake_download(repo, path, cache_dir=None, local_files_only=False):
        asked["local_files_only"] = local_files_only
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(UserError) as exc:
        fetch_weights("potsdam-rgb", cache_dir=tmp_path)
    assert asked == {"local_files_only": not resolves}
    assert "--checkpoint PATH" in exc.value.one_line()
