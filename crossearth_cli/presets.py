"""The released CrossEarth checkpoints (reference §2), one row each, and how to fetch them.

Everything a run needs besides the weights: class names and colours, the crop and stride the
paper's sliding window used, the band order the model was trained on (IRRG = near-infrared,
red, green in the file's first three channels), and the ground sampling distance (GSD) of
the training imagery, so a scene can be resampled to something the model has seen.

No torch import here: ``crossearth models`` must be instant.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from crossearth_cli.errors import ConfigError, UserError

__all__ = [
    "HF_REPO",
    "BACKBONE_512",
    "BACKBONE_1024",
    "Preset",
    "PRESETS",
    "get_preset",
    "preset_names",
    "find_preset_for_file",
    "fetch_weights",
    "fetch_backbone",
    "hf_url",
]

HF_REPO = "Cusyoung/CrossEarth"  # the Hub organisation is "Cusyoung", not the GitHub "Cuzyoung"
BACKBONE_512 = "dinov2_converted.pth"
BACKBONE_1024 = "dinov2_converted_1024x1024.pth"

ISPRS_CLASSES = ("impervious_surface", "building", "low_vegetation", "tree", "car", "clutter")
ISPRS_PALETTE = (
    (255, 255, 255),
    (0, 0, 255),
    (0, 255, 255),
    (0, 255, 0),
    (255, 255, 0),
    (255, 0, 0),
)
RESCUE_CLASSES = ("impervious_surface", "building", "vegetation", "car", "clutter")
RESCUE_PALETTE = ((255, 255, 255), (0, 0, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
CASID_CLASSES = ("background", "building", "forest", "road", "water")
CASID_PALETTE = ((0, 0, 0), (255, 255, 0), (85, 255, 0), (255, 0, 0), (0, 112, 255))
BINARY_PALETTE = ((0, 0, 0), (255, 255, 255))

# Reference §5: the code names index 0 the object and index 1 "Background", but the raw WHU /
# DeepGlobe / Massachusetts masks mark the object white (255) and the 0/1 conversion scripts
# were not released, so index 1 is most likely the object. Unconfirmed: we keep the names as
# the code writes them and say so in ``label_note`` (check one prediction visually, or read
# meta['dataset_meta'] of the file, which load_checkpoint prefers when present).
LABEL_DOUBT = (
    "class names as written in CrossEarth's code; index 1 is probably the object and index 0 "
    "the background (reference §5) - check one prediction"
)


@dataclass(frozen=True)
class Preset:
    name: str  # CLI name: --model NAME
    file: str  # file name as released
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]
    bands: str  # "IRRG" or "RGB": what the first three input channels must hold
    crop_size: int  # sliding-window crop (= model img_size)
    stride: int
    gsd_m: float | None  # training imagery's ground sampling distance, metres (None: unknown)
    trained_on: str
    backbone: str  # dinov2_converted*.pth to pair with a split (Rein + head only) file
    hf_path: str = ""  # path inside HF_REPO; defaults to ``file`` (files sit at the repo root)
    label_note: str = ""

    @property
    def repo_path(self) -> str:
        return self.hf_path or self.file

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _p512(**kw) -> Preset:
    return Preset(crop_size=512, stride=341, backbone=BACKBONE_512, **kw)


def _p1024(**kw) -> Preset:
    return Preset(crop_size=1024, stride=683, backbone=BACKBONE_1024, **kw)


PRESETS: tuple[Preset, ...] = (
    _p512(
        name="potsdam-irrg",
        file="Potsdam(i)-source.pth",
        classes=ISPRS_CLASSES,
        palette=ISPRS_PALETTE,
        bands="IRRG",
        gsd_m=0.05,
        trained_on="ISPRS Potsdam IRRG orthophotos (P(i)2V, P(i)2P(r))",
    ),
    _p512(
        name="potsdam-rgb",
        file="Potsdam(r)-source.pth",
        classes=ISPRS_CLASSES,
        palette=ISPRS_PALETTE,
        bands="RGB",
        gsd_m=0.05,
        trained_on="ISPRS Potsdam RGB orthophotos (P(r)2P(i), P(r)2V)",
    ),
    _p512(
        name="vaihingen-irrg",
        file="Vaihingen-source.pth",
        classes=ISPRS_CLASSES,
        palette=ISPRS_PALETTE,
        bands="IRRG",
        gsd_m=0.09,
        trained_on="ISPRS Vaihingen IRRG orthophotos (V2P(i), V2P(r))",
    ),
    _p512(
        name="potsdam-rgb-rescuenet",
        file="Potsdam(r)2RescueNet.pth",
        classes=RESCUE_CLASSES,
        palette=RESCUE_PALETTE,
        bands="RGB",
        gsd_m=0.05,
        trained_on="Potsdam RGB relabelled to RescueNet's 5 classes (tested on RescueNet UAV)",
    ),
    _p512(
        name="potsdam-irrg-rescuenet",
        file="Potsdam(i)2RescueNet.pth",
        classes=RESCUE_CLASSES,
        palette=RESCUE_PALETTE,
        bands="IRRG",
        gsd_m=0.05,
        trained_on="Potsdam IRRG relabelled to RescueNet's 5 classes (tested on RescueNet UAV)",
    ),
    _p512(
        name="whu-building-a2s",
        file="WHU-Building-A2S.pth",
        classes=("Building", "Background"),
        palette=BINARY_PALETTE,
        bands="RGB",
        gsd_m=0.3,
        trained_on="WHU building, aerial subset (tested on satellite II)",
        label_note=LABEL_DOUBT,
    ),
    _p512(
        name="whu-building-s2a",
        file="WHU-Building-S2A.pth",
        classes=("Building", "Background"),
        palette=BINARY_PALETTE,
        bands="RGB",
        gsd_m=0.45,
        trained_on="WHU building, satellite II subset (tested on aerial)",
        label_note=LABEL_DOUBT,
    ),
    _p1024(
        name="deepglobe-road",
        file="D2M-Rein.pth",
        classes=("Road", "Background"),
        palette=BINARY_PALETTE,
        bands="RGB",
        gsd_m=0.5,
        trained_on="DeepGlobe roads (tested on Massachusetts roads, 1 m)",
        label_note=LABEL_DOUBT,
    ),
    # CASID: the climate-zone splits of a satellite land-cover set; the reference does not
    # state its pixel size, so gsd_m stays unknown rather than guessed.
    _p1024(
        name="casid-sub",
        file="casid-sub-source.pth",
        classes=CASID_CLASSES,
        palette=CASID_PALETTE,
        bands="RGB",
        gsd_m=None,
        trained_on="CASID subtropical monsoon zone",
    ),
    _p1024(
        name="casid-tem",
        file="casid-tem-source.pth",
        classes=CASID_CLASSES,
        palette=CASID_PALETTE,
        bands="RGB",
        gsd_m=None,
        trained_on="CASID temperate monsoon zone",
    ),
    _p1024(
        name="casid-tms",
        file="casid-tms-source.pth",
        classes=CASID_CLASSES,
        palette=CASID_PALETTE,
        bands="RGB",
        gsd_m=None,
        trained_on="CASID tropical monsoon zone",
    ),
    _p1024(
        name="casid-trf",
        file="casid-trf-source.pth",
        classes=CASID_CLASSES,
        palette=CASID_PALETTE,
        bands="RGB",
        gsd_m=None,
        trained_on="CASID tropical rainforest zone",
    ),
)

_BY_NAME = {p.name: p for p in PRESETS}


def preset_names() -> list[str]:
    return [p.name for p in PRESETS]


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); ConfigError listing valid names."""
    p = _BY_NAME.get(name.strip().lower())
    if p is None:
        raise ConfigError(
            f"unknown model '{name}'",
            hint="valid names: " + ", ".join(preset_names()) + " (see: crossearth models)",
        )
    return p


def find_preset_for_file(filename: str) -> Preset | None:
    """The preset whose released file name matches ``filename`` (case-insensitive), if any."""
    base = os.path.basename(filename).lower()
    for p in PRESETS:
        if p.file.lower() == base:
            return p
    return None


def hf_url(repo_path: str) -> str:
    return f"https://huggingface.co/{HF_REPO}/resolve/main/{repo_path}"


def hub_host_resolves() -> bool:
    """Whether the hub's host name resolves. Without a network (or DNS) huggingface_hub would
    retry with back-off for ~20 s before failing; this answers at once in that case."""
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


def _download(repo_path: str, cache_dir: str | Path | None, what: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download

        # offline: only the local cache (a file downloaded earlier is still found)
        return Path(hf_hub_download(HF_REPO, repo_path, cache_dir=cache_dir,
                                    local_files_only=not hub_host_resolves()))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, 404, auth, disk: all the same advice
        reason = type(exc).__name__
        flag = "--backbone" if what == "backbone" else "--checkpoint"
        raise UserError(
            f"cannot download {what} '{repo_path}' from the Hugging Face Hub ({reason})",
            hint=f"download {hf_url(repo_path)} yourself and pass {flag} PATH",
        ) from exc


def fetch_weights(preset: Preset | str, cache_dir: str | Path | None = None) -> Path:
    """Download (or reuse from the Hugging Face cache) the preset's checkpoint; its path.

    Offline (``HF_HUB_OFFLINE=1``) or on any hub error: a UserError with one line telling the
    user to download the file and pass ``--checkpoint PATH``.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    return _download(p.repo_path, cache_dir, "checkpoint")


def fetch_backbone(preset: Preset | str, cache_dir: str | Path | None = None) -> Path:
    """Download the ``dinov2_converted*.pth`` that completes a split checkpoint of ``preset``."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    return _download(p.backbone, cache_dir, "backbone")
