"""Model card: everything a pipeline needs to feed a network and present its output."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.normalize import NORMALIZATIONS, NUMBERS
from ..errors import InputError, ModelError
from ..jsonfile import read_json
from . import description as desc


#: `extra` key of a network that takes only inputs of its patch size (a ViT's position embeddings: UNETR's `img_size`)
FIXED_INPUT_SIZE = "fixed_input_size"
#: `extra` key: modules that start untrained (a new task head), which every adaptation trains in full
TRAINED_IN_FULL = "trained_in_full"
#: `extra` key: the network is a TorchScript program (it predicts; adaptation jobs need an eager network)
TORCHSCRIPT = "torchscript"

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
    #: what each input channel is, in the network's order (["FLAIR", "T1c"]): the panels label their channel
    #: selectors with them; empty when the model's files do not say
    channel_names: list[str] = field(default_factory=list)
    #: the file the card was read from, named in its errors (not part of the card: never saved)
    described_in: str = field(default="", compare=False, repr=False)

    def __post_init__(self):
        """Refuse values that would fail deep inside resampling or inference (a NaN spacing, a negative ROI, an
        unknown orientation), naming the card's file, before any job or network exists."""
        where = self.described_in or f"model card '{self.id}'"
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"{where}: spatial_dims {self.spatial_dims!r} must be 2 or 3")
        lengths = (self.spatial_dims,)
        if self.spacing is not None:
            self.spacing = desc.spacing(self.spacing, where, "spacing", lengths)
        self.patch_size = desc.sizes(self.patch_size, where, "patch_size", lengths)
        self.inference_roi = desc.sizes(self.inference_roi, where, "inference_roi", lengths)
        self.input_channels = desc.integer(self.input_channels, where, "input_channels", minimum=1)
        self.divisible_by = desc.integer(self.divisible_by, where, "divisible_by", minimum=1)
        if self.channel_names:
            names = desc.sequence(self.channel_names, where, "channel_names", length=self.input_channels)
            self.channel_names = [str(name) for name in names]
        if self.spatial_dims == 3:
            self.orientation = desc.axcodes(self.orientation, where, "orientation")
        self._check_normalization(where)
        for index, label in enumerate(self.labels):
            label.value = desc.integer(label.value, where, f"labels[{index}].value", minimum=0)
            colour = desc.sequence(label.color, where, f"labels[{index}].color", length=3)
            label.color = tuple(desc.number(c, where, f"labels[{index}].color") for c in colour)
        if len({label.value for label in self.labels}) != len(self.labels):
            raise ModelError(f"{where}: 'labels' repeat a value ({[label.value for label in self.labels]})")

    def _check_normalization(self, where: str) -> None:
        scheme = desc.mapping(self.normalization, where, "normalization")
        name = scheme.get("name", "none")
        if name not in NORMALIZATIONS:
            raise desc.refusal(where, "normalization.name", f"one of {', '.join(NORMALIZATIONS)}", name)
        missing = [key for key in NORMALIZATIONS[name].required if key not in scheme]
        if missing:
            raise ModelError(f"{where}: normalisation '{name}' needs '{missing[0]}'")
        for key in NUMBERS:
            if key in scheme:
                desc.number(scheme[key], where, f"normalization.{key}")
        if "lower" in scheme and "upper" in scheme and scheme["lower"] >= scheme["upper"]:
            raise ModelError(f"{where}: normalisation bounds 'lower' {scheme['lower']} ≥ 'upper' {scheme['upper']}")

    def training_patch(self, requested: list[int] | None) -> tuple[int, ...]:
        """The training patch: the card's, or the requested one if the network can train on it. Each edge must be a
        multiple of `divisible_by` and at least two of them: at one multiple the bottleneck holds a single voxel,
        where instance and batch norms cannot train (the run would fail mid-training). `[N]` is N along every axis."""
        if not requested:
            return self.patch_size
        where = f"train.patch_size: {list(requested)}"
        if len(requested) == 1:  # one edge for every axis: a square for a 2D model, a cube for a 3D one
            requested = list(requested) * self.spatial_dims
        if len(requested) != self.spatial_dims:
            raise InputError(f"{where} has {len(requested)} entries; model '{self.id}' is {self.spatial_dims}D")
        if self.extra.get(FIXED_INPUT_SIZE) and tuple(requested) != tuple(self.patch_size):
            raise InputError(f"{where}: model '{self.id}' takes inputs of its own size only "
                             f"({'×'.join(map(str, self.patch_size))}: a ViT's position embeddings); leave the patch "
                             "size out")
        step = self.divisible_by
        if step > 1 and any(edge % step or edge < 2 * step for edge in requested):
            raise InputError(f"{where}: model '{self.id}' trains on edges that are multiples of {step} and at least "
                             f"{2 * step} voxels (its own patch: {list(self.patch_size)})")
        return tuple(requested)

    def channel_count(self) -> str:
        """The image channels a case needs, as messages name them: "2 (FLAIR, T1c)", or "2" unnamed."""
        names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
        return f"{self.input_channels}{names}"

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> set[int]:
        return {label.value for label in self.labels}

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "described_in"}

    @property
    def is_torchscript(self) -> bool:
        return bool(self.extra.get(TORCHSCRIPT)) or self.extra.get("format") == TORCHSCRIPT

    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        data = {key: value for key, value in desc.mapping(data, source, "(top level)").items()
                if key != "described_in"}
        labels = desc.sequence(data.get("labels"), source, "labels")
        try:
            data["labels"] = [LabelInfo(**{**desc.mapping(lab, source, f"labels[{index}]"),
                                           "color": tuple(lab.get("color", (1, 0, 0)))})
                              for index, lab in enumerate(labels)]
            data["extra"] = desc.mapping(data.get("extra", {}), source, "extra")
            return cls(**data, described_in=source)
        except TypeError as exc:
            raise ModelError(f"{source}: invalid model card ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> "ModelCard":
        return cls.from_dict(read_json(path, "model card", ModelError), str(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def holds_untrained_head(metadata: dict) -> bool:
    """Whether an adapter's kept state (its `metadata`, as the worker writes it) is a new head as it started: a model
    whose head is trained in full (`trained_in_full`) kept at step 0, as a cancel before the first trained audit (or
    an earlier version's selection) leaves it. Its predictions mean nothing."""
    return bool(metadata.get(TRAINED_IN_FULL)) and metadata.get("best_step") == 0


def refuse_untrained_head(config: dict, folder: str | Path) -> None:
    """One line refusing to predict with an adapter (its loaded `config`) that `holds_untrained_head`."""
    metadata = config.get("metadata")
    if isinstance(metadata, dict) and holds_untrained_head(metadata):
        raise InputError(f"{folder}: this adapter holds the model's new head untrained (no trained state was kept), "
                         "so its predictions mean nothing; adapt the model to completion and use that adapter")
