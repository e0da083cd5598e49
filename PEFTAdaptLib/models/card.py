"""Model card: everything a pipeline needs to feed a network and present its output."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError, ModelError
from ..jsonfile import read_json


#: `extra` key of a network that takes only inputs of its patch size (a ViT's position embeddings: UNETR's `img_size`)
FIXED_INPUT_SIZE = "fixed_input_size"
#: `extra` key: modules that start untrained (a new task head), which every adaptation trains in full
TRAINED_IN_FULL = "trained_in_full"


@dataclass
class LabelInfo:
    value: int
    name: str
    color: tuple[float, float, float] = (1.0, 0.0, 0.0)  # RGB in [0, 1]
    #: Slicer terminology entry string (context~category~type~modifier~anatomic~region~regionModifier), optional
    terminology: str = ""


@dataclass
class ModelCard:
    id: str
    title: str
    description: str
    modality: str
    input_channels: int
    spacing: tuple[float, ...] | None  # mm; None keeps the image's own spacing (or fits, see fit_to_roi)
    orientation: str  # DICOM letters as nibabel's canonical "RAS"; "" keeps the image's own (2D: always kept)
    normalization: dict
    patch_size: tuple[int, ...]  # training patch (spatial_dims entries)
    inference_roi: tuple[int, ...]  # sliding-window ROI (spatial_dims entries)
    labels: list[LabelInfo]  # background (0) first
    license: str
    source: str
    version: str = "1"
    divisible_by: int = 1  # spatial size multiple the network needs
    #: frame the foreground bounding box (+10 % margin) into exactly `inference_roi` voxels instead of a fixed spacing
    fit_to_roi: bool = False
    citation: str = ""
    extra: dict = field(default_factory=dict)
    #: 3: volumes; 2: 2D images and single slices of volumes (`data/planar.py`)
    spatial_dims: int = 3

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"model card '{self.id}': spatial_dims {self.spatial_dims!r} must be 2 or 3")
        for key in ("spacing", "patch_size", "inference_roi"):
            value = getattr(self, key)
            if value is not None and len(value) != self.spatial_dims:
                raise ModelError(f"model card '{self.id}': {key} {list(value)} does not have spatial_dims = "
                                 f"{self.spatial_dims} entries")

    def training_patch(self, requested: list[int] | None) -> tuple[int, ...]:
        """The training patch: the card's, or the requested one if the network can train on it. Each edge must be a
        multiple of `divisible_by` and at least two of them: at one multiple the bottleneck holds a single voxel,
        where instance and batch norms cannot train (the run would fail mid-training)."""
        if not requested:
            return self.patch_size
        where = f"train.patch_size: {list(requested)}"
        if len(requested) != self.spatial_dims:
            raise InputError(f"{where} has {len(requested)} entries; model '{self.id}' is {self.spatial_dims}D")
        step = self.divisible_by
        if step > 1 and any(edge % step or edge < 2 * step for edge in requested):
            raise InputError(f"{where}: model '{self.id}' trains on edges that are multiples of {step} and at least "
                             f"{2 * step} voxels (its own patch: {list(self.patch_size)})")
        return tuple(requested)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> set[int]:
        return {label.value for label in self.labels}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        try:
            data = dict(data)
            data["labels"] = [LabelInfo(**{**lab, "color": tuple(lab.get("color", (1, 0, 0)))}) for lab in data["labels"]]
            for key in ("spacing", "patch_size", "inference_roi"):
                if data.get(key) is not None:
                    data[key] = tuple(data[key])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ModelError(f"{source}: invalid model card ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        return cls.from_dict(read_json(path, "model card", ModelError), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))
