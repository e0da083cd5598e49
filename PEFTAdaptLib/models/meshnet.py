"""brainchop MeshNet models: a stack of dilated 3D convolutions described by `model.json`, weights in `model.pth`.

Two weight layouts exist in brainchop's model zoo, both read here:
- flat (`bnorm: false`): `model.{2i}` convolutions with an activation between them (ReLU, or ELU/GELU when the
  JSON says `elu`/`gelu`);
- blocks (`bnorm: true`, e.g. mindgrab): `model.{i}.0` convolution + parameter-free GroupNorm (one group per
  channel) + activation, then a final plain `model.{n}` 1×1×1 convolution. mindgrab's `layers.json` also lists a
  batch norm without statistics; it is the identity at inference and has no weights, so it is left out.
Channel counts come from the weight shapes (brainchop writes -1 for "as trained"); biases where the file has them.
`model.pth` is a safetensors file despite its name for most models and a PyTorch zip for mindgrab: both load safely.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ModelError
from ..jsonfile import read_json
from . import description as desc
from .card import LabelInfo, ModelCard
from .foundation import FoundationModel
from .safe_load import is_safetensors

MODEL_JSON = "model.json"
#: brainchop's newer op list (mindgrab); where present it wins over model.json, whose channel counts may be stale
LAYERS_JSON = "layers.json"
WEIGHTS = "model.pth"
COLORMAP = "colormap.json"
#: brainchop's input: a FreeSurfer-conformed T1 (256³, 1 mm, LIA as nibabel names it), intensities min-max to [0, 1]
CONFORMED = (256, 256, 256)
#: bounds of a layer's integer settings: brainchop's models use kernels of 3 and dilations up to 16; beyond these a
#: convolution over the 256³ input would need more memory than any machine has
LAYER_BOUNDS = {"kernel_size": (1, 15), "stride": (1, 4), "dilation": (1, 64), "padding": (0, 512)}
LAYER_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1}
#: the largest channel count a layer may declare (-1: "as trained", read from the weights)
MAX_CHANNELS = 4096


def is_meshnet_folder(folder: Path) -> bool:
    return (folder / MODEL_JSON).is_file() and (folder / WEIGHTS).is_file()


def _colormap(folder: Path, classes: int) -> tuple[Path, dict] | None:
    """brainchop ships several colour maps for some models (model5_gw_ae: 2-class `colormap.json`, 3-class
    `colormap3.json`): take `colormap.json` if its labels fit the network, else `colormap{classes}.json`."""
    candidates = [folder / COLORMAP, folder / f"colormap{classes}.json"]
    present = [path for path in candidates if path.is_file()]
    for path in present:
        colormap = read_json(path, "brainchop colormap", ModelError)
        if len(desc.sequence(colormap.get("labels", []), path, "labels")) == classes:
            return path, colormap
    if present:
        raise ModelError(f"{present[0]}: no colour map with {classes} labels for a network with {classes} output classes")
    return None


def _labels(folder: Path, classes: int) -> list[LabelInfo]:
    found = _colormap(folder, classes)
    if found is None:
        return [LabelInfo(0, "background", (0.0, 0.0, 0.0))] + [LabelInfo(i, f"class {i}") for i in range(1, classes)]
    path, colormap = found
    names = colormap["labels"]
    channels = []
    for key in ("R", "G", "B"):
        values = desc.sequence(colormap.get(key), path, key)
        if len(values) < len(names):
            raise desc.refusal(path, key, f"a list of {len(names)} values (one per label)", values)
        channels.append([desc.number(v, path, f"{key}[{i}]") / 255 for i, v in enumerate(values[:len(names)])])
    return [LabelInfo(i, str(name), (channels[0][i], channels[1][i], channels[2][i])) for i, name in enumerate(names)]


def _checked_layers(layers, path: Path) -> list[dict]:
    """Every layer's integer settings, bounded before any convolution is built (a zero stride, a NaN dilation or a
    100000-voxel padding would otherwise fail in torch, or allocate without limit)."""
    if not isinstance(layers, list) or not layers:
        raise ModelError(f"{path}: no 'layers' list")
    checked = []
    for index, layer in enumerate(layers):
        where = f"layers[{index}]"
        layer = desc.mapping(layer, path, where)
        if "kernel_size" not in layer:
            raise ModelError(f"{path}: layer {index} has no 'kernel_size'")
        values = {**LAYER_DEFAULTS, **layer}
        for key, (low, high) in LAYER_BOUNDS.items():
            values[key] = desc.integer(values[key], path, f"{where}.{key}", minimum=low, maximum=high)
        for key in ("in_channels", "out_channels"):
            if key in layer and layer[key] != -1:
                values[key] = desc.integer(layer[key], path, f"{where}.{key}", minimum=1, maximum=MAX_CHANNELS)
        checked.append(values)
    return checked


def read_spec(folder: Path) -> dict:
    """model.json's layer description, or the equivalent of layers.json's op list where that file exists."""
    spec = read_json(folder / MODEL_JSON, "brainchop model description", ModelError)
    if not (folder / LAYERS_JSON).is_file():
        return {**spec, "layers": _checked_layers(spec.get("layers"), folder / MODEL_JSON)}
    path = folder / LAYERS_JSON
    ops = read_json(path, "brainchop layer list", ModelError).get("forward_pass")
    if not isinstance(ops, list):
        raise ModelError(f"{path}: no 'forward_pass' list")
    ops = [desc.mapping(op, path, f"forward_pass[{index}]") for index, op in enumerate(ops)]
    names = {op.get("op") for op in ops}
    layers = [op.get("params", {}) for op in ops if op.get("op") == "conv3d"]
    if not layers:
        raise ModelError(f"{path}: 'forward_pass' holds no conv3d op")
    return {**spec, "layers": _checked_layers(layers, path), "bnorm": "group_norm" in names, "gelu": "gelu" in names,
            "elu": "elu" in names}


def meshnet_card(folder: Path, spec: dict, classes: int, model_id: str | None = None) -> ModelCard:
    header = spec.get("header", "brainchop MeshNet")
    return ModelCard(
        id=model_id or f"meshnet-{folder.name}",
        title=f"brainchop MeshNet {folder.name}",
        description=header,
        modality="MR (T1w, FreeSurfer-conformed)",
        input_channels=1,
        spacing=(1.0, 1.0, 1.0),
        orientation="LIA",
        normalization={"name": "minmax"},
        patch_size=(96, 96, 96),
        inference_roi=CONFORMED,
        labels=_labels(folder, classes),
        license="MIT",
        source=f"brainchop model zoo ({folder})",
        extra={"format": "meshnet"},
    )


def _declared_classes(folder: Path, spec: dict) -> int:
    """Output classes without reading tensors: the last layer's out_channels, else the safetensors header."""
    declared = spec["layers"][-1].get("out_channels", -1)
    if declared > 0:
        return declared
    weights = folder / WEIGHTS
    if weights.is_file() and is_safetensors(weights):
        return _classes_in_header(weights)
    raise ModelError(f"{folder / MODEL_JSON}: the last layer's out_channels is -1; the classes show only on loading")


def _classes_in_header(weights: Path) -> int:
    """The output channels of the last `model.<i>[.<j>].weight` tensor, from the safetensors header alone."""
    try:
        with open(weights, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        tensors = desc.mapping(header, weights, "header")
        layers = {tuple(int(p) for p in k.split(".")[1:-1]): v for k, v in tensors.items()
                  if k.startswith("model.") and k.endswith(".weight") and all(p.isdigit() for p in k.split(".")[1:-1])}
        shape = layers[max(layers)]["shape"] if layers else None
        return desc.integer(shape[0] if isinstance(shape, list) and shape else None, weights, "last weight's shape",
                            minimum=1)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ModelError(f"{weights}: unreadable safetensors header ({exc})") from None


def meshnet_card_from_folder(folder: Path, model_id: str | None = None) -> ModelCard:
    """The card from the folder's JSON files (no torch)."""
    spec = read_spec(folder)
    return meshnet_card(folder, spec, _declared_classes(folder, spec), model_id)


def load_meshnet(folder: str | Path, model_id: str | None = None) -> FoundationModel:
    from ..adapters.io import fingerprint
    from .meshnet_network import build_meshnet
    from .safe_load import load_into, load_state_dict_file

    folder = Path(folder)
    spec = read_spec(folder)
    weights = folder / WEIGHTS
    state = load_state_dict_file(weights)
    network = load_into(build_meshnet(spec, state, weights), state, weights).eval()
    classes = network.model[-1].out_channels
    card = meshnet_card(folder, spec, classes, model_id)
    files = {"model": str(folder / MODEL_JSON), "weights": str(weights)}
    colormap = _colormap(folder, classes)
    if colormap is not None:
        files["colormap"] = str(colormap[0])
    return FoundationModel(network, card, fingerprint(network), files)
