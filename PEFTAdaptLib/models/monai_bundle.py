"""MONAI bundles (model-zoo layout): configs/inference.json + configs/metadata.json + models/model.pt (or .ts).

A bundle config is a small program: `$` strings are Python expressions, `_target_` names any callable, and
`_requires_`, `_mode_`, `%` macros run or load more. MONAI's parser is never used on it. Only `network_def` is
built, by this module: every `_target_` in it (nested ones too) must be a network class (`torch.nn.Module` subclass)
of `monai.networks` or `dynamic_network_architectures`, every other value plain (numbers, strings, lists, `@`
references to plain values), no MONAI special key, and no argument that makes a network download or read weights
(`pretrained`, URLs, files). Everything else (spacing, intensity scaling, orientation, ROI) is read as plain values,
never evaluated. A TorchScript bundle (`models/model.ts`) is code and loads only once the user trusted it
(`trust.py`).
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from typing import Any

from ..errors import ModelError
from . import description as desc
from .card import FIXED_INPUT_SIZE, TORCHSCRIPT, LabelInfo, ModelCard
from .foundation import FoundationModel
from .network_classes import import_network_class
from .trust import load_trusted_torchscript, require_trusted

CONFIG_NAMES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
METADATA = "configs/metadata.json"
WEIGHT_NAMES = ("models/model.safetensors", "models/model.pt", "models/model.ts")
#: transform names (MONAI dictionary transforms) the card is read from
SPACING, ORIENTATION = "Spacingd", "Orientationd"
SCALE_RANGE, NORMALIZE = "ScaleIntensityRanged", "NormalizeIntensityd"
PERCENTILES = "ScaleIntensityRangePercentilesd"
#: the training config, and the crop transforms whose `spatial_size` is the training patch
TRAIN_CONFIG = "configs/train.json"
TRAINING_CROPS = ("RandCropByPosNegLabeld", "RandCropByLabelClassesd", "RandSpatialCropd", "RandSpatialCropSamplesd")
#: packages whose network classes a `network_def` may name; a bare name (MONAI's "UNet") is looked up in the modules
NETWORK_PACKAGES = ("monai.networks.", "dynamic_network_architectures.")
BARE_NAME_MODULES = ("monai.networks.nets", "monai.networks.blocks")
#: the only MONAI special keys accepted in a network definition (`_desc_` is a comment)
PLAIN_SPECIAL_KEYS = ("_target_", "_desc_")
#: constructor arguments with which MONAI networks download or read weights (`pretrained`, `pretrained_url`,
#: `checkpoint`, TorchVisionFCModel's `weights`, Transchex's `path_or_repo_id` / `filename`…): refused unless off
FETCHING_ARGUMENT = re.compile(r"pretrain|url|repo|file|^checkpoint$|^weights$")


def config_path(folder: Path) -> Path | None:
    return next((folder / name for name in CONFIG_NAMES if (folder / name).is_file()), None)


def weights_path(folder: Path) -> Path | None:
    return next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)


def is_bundle_folder(folder: Path) -> bool:
    return config_path(folder) is not None or (folder / METADATA).is_file()


def _load(path: Path) -> dict:
    """JSON without MONAI (cards are listed before torch is installed); YAML through MONAI's reader."""
    if not path.is_file():
        raise ModelError(f"{path}: file is missing")
    try:
        if path.suffix == ".json":
            content = json.loads(path.read_text())
        else:
            from monai.bundle import ConfigParser

            content = ConfigParser.load_config_file(str(path))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ModelError(f"{path}: not a readable bundle config ({exc})") from None
    if not isinstance(content, dict):
        raise ModelError(f"{path}: top level is not a mapping")
    return content


def _lookup(config: dict, ref: str, path: Path) -> Any:
    node: Any = config
    for part in ref.split("#"):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise ModelError(f"{path}: reference '@{ref}' points to no key")
    return node


def _expand(value: Any, config: dict, path: Path, depth: int = 0) -> Any:
    """Substitute plain `@id` references by their raw content (no evaluation)."""
    if depth > 20:
        raise ModelError(f"{path}: references nest too deep (a cycle?)")
    if isinstance(value, str) and value.startswith("@"):
        return _expand(_lookup(config, value[1:], path), config, path, depth + 1)
    if isinstance(value, dict):
        return {k: _expand(v, config, path, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, config, path, depth + 1) for v in value]
    return value


def _network_class(target: Any, path: Path, where: str) -> type:
    if isinstance(target, str) and "." not in target:
        module = next((m for m in BARE_NAME_MODULES if hasattr(importlib.import_module(m), target)), None)
        if module is None:
            raise ModelError(f"{path}: refused to import '{target}' at {where}: not a network class of "
                             f"{', '.join(BARE_NAME_MODULES)}")
        target = f"{module}.{target}"
    return import_network_class(target, NETWORK_PACKAGES, path, where)


def _refuse_fetching(cls: type, arguments: dict, path: Path, where: str) -> None:
    """A network that would download or read weights while being built (network access, files outside the bundle)."""
    try:
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()
                    if p.default is not inspect.Parameter.empty}
    except (TypeError, ValueError):
        defaults = {}
    for name, value in {**defaults, **arguments}.items():
        if FETCHING_ARGUMENT.search(name) and value not in (None, False, "", 0):
            raise ModelError(f"{path}: refused '{name}: {str(value)[:60]}' of {cls.__name__} at {where}: it would "
                             "download or read weights while building the network; the bundle's own weights are used")


def _network(value: Any, path: Path, where: str, build: bool) -> Any:
    """Check a network definition and, with `build`, instantiate it: plain values and network classes only."""
    if isinstance(value, str) and value[:1] in ("$", "%"):
        raise ModelError(f"{path}: refused to evaluate '{value[:60]}' at {where}: the network definition may only "
                         "hold plain values and network classes")
    if isinstance(value, list):
        return [_network(item, path, f"{where}#{index}", build) for index, item in enumerate(value)]
    if not isinstance(value, dict):
        return value
    special = [key for key in value if key[:1] == key[-1:] == "_" and key not in PLAIN_SPECIAL_KEYS]
    if special:
        raise ModelError(f"{path}: refused '{special[0]}' at {where}: MONAI's special keys run or load code; a network "
                         "definition holds a `_target_` and plain arguments")
    arguments = {key: _network(item, path, f"{where}#{key}", build) for key, item in value.items()
                 if key not in PLAIN_SPECIAL_KEYS}
    if "_target_" not in value:
        return arguments
    cls = _network_class(value["_target_"], path, where)
    _refuse_fetching(cls, arguments, path, where)
    if not build:
        return None
    try:
        return cls(**arguments)
    except Exception as exc:  # noqa: BLE001 - a network constructor raises many types for bad arguments
        raise ModelError(f"{path}: cannot build {where} ({type(exc).__name__}: {exc})") from None


def _network_def(folder: Path) -> tuple[Path, Any]:
    path = config_path(folder)
    if path is None:
        raise ModelError(f"{folder / CONFIG_NAMES[0]}: file is missing")
    config = _load(path)
    if "network_def" not in config:
        raise ModelError(f"{path}: key 'network_def' is missing")
    network_def = _expand(config["network_def"], config, path)
    if not (isinstance(network_def, dict) and "_target_" in network_def):
        raise ModelError(f"{path}: 'network_def' names no network class (`_target_`)")
    return path, network_def


def _transforms(config: dict, path: Path, key: str = "preprocessing") -> list[dict]:
    """Every transform dict under `key` (references followed, expressions skipped)."""
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                found.append(node)
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(_expand(config.get(key, {}), config, path))
    return found


def _named(transforms: list[dict], name: str) -> dict | None:
    return next((t for t in transforms if t["_target_"].rsplit(".", 1)[-1] == name), None)


def _plain(value: Any, key: str, path: Path) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        raise ModelError(f"{path}: '{key}' is an expression ({value[:60]}); the card needs a plain value there")
    return value


def _normalization(transforms: list[dict], path: Path) -> dict:
    percentiles = _named(transforms, PERCENTILES)
    if percentiles is not None:  # percentiles → [0, 1], then z-score: the spinal-cord networks' scheme
        if _named(transforms, NORMALIZE) is None:
            raise ModelError(f"{path}: {PERCENTILES} without a following {NORMALIZE} is not supported")
        lower, upper = (desc.number(_plain(percentiles.get(k), f"{PERCENTILES}.{k}", path), path, f"{PERCENTILES}.{k}")
                        for k in ("lower", "upper"))
        return {"name": "percentile_zscore", "p_low": lower, "p_high": upper}
    scale = _named(transforms, SCALE_RANGE)
    if scale is not None:
        values = {k: _plain(scale.get(k, d), f"{SCALE_RANGE}.{k}", path)
                  for k, d in (("a_min", None), ("a_max", None), ("b_min", None), ("b_max", None), ("clip", False))}
        if values["a_min"] is None or values["a_max"] is None:
            raise ModelError(f"{path}: {SCALE_RANGE} without 'a_min'/'a_max'")
        for key in ("a_min", "a_max", "b_min", "b_max"):
            if values[key] is not None:
                desc.number(values[key], path, f"{SCALE_RANGE}.{key}")
        scheme = {"name": "clip_scale", "lower": values["a_min"], "upper": values["a_max"], "clip": bool(values["clip"])}
        if values["b_min"] is not None and values["b_max"] is not None:
            scheme.update(out_min=values["b_min"], out_max=values["b_max"])
        return scheme
    normalize = _named(transforms, NORMALIZE)
    if normalize is not None:
        return {"name": "zscore", "nonzero": 0} if _plain(normalize.get("nonzero", False), NORMALIZE, path) \
            else {"name": "zscore"}
    return {"name": "none"}


def _data_format(metadata: dict, path: Path, part: str) -> dict:
    """`network_data_format#<part>`'s entry ('image' / 'pred', else the first one), checked to be mappings."""
    formats = desc.mapping(metadata.get("network_data_format", {}), path, "network_data_format")
    entries = desc.mapping(formats.get(part, {}), path, f"network_data_format#{part}")
    name = next((n for n in ("image", "pred") if entries.get(n)), next(iter(entries), None))
    return desc.mapping(entries[name], path, f"network_data_format#{part}#{name}") if name is not None else {}


def _labels(metadata: dict, path: Path) -> list[LabelInfo]:
    field = "network_data_format#outputs#pred#channel_def"
    channel_def = _data_format(metadata, path, "outputs").get("channel_def")
    if channel_def is None:
        raise ModelError(f"{path}: key '{field}' is missing")
    values = {desc.class_index(key, path, field): name for key, name in desc.mapping(channel_def, path, field).items()}
    labels = []
    for index, (value, name) in enumerate(sorted(values.items())):
        color = (0.0, 0.0, 0.0) if index == 0 else ((index * 0.37) % 1.0, (index * 0.61) % 1.0, (index * 0.83) % 1.0)
        labels.append(LabelInfo(value, str(name), color))
    return labels


def _channel_names(input_info: dict, path: Path, channels_field: str) -> list[str]:
    """`network_data_format#inputs#image#channel_def` ({"0": "FLAIR", "1": "T1c"}, as MONAI's BraTS bundle writes
    it) in channel order; none when the bundle does not name its channels."""
    field = "network_data_format#inputs#image#channel_def"
    names = desc.indexed_names(input_info.get("channel_def", {}), path, field)
    count = input_info.get("num_channels", 1)
    if names and len(names) != count:
        raise ModelError(f"{path}: '{field}' names {len(names)} channel(s) but '{channels_field}' is {count}")
    return names


def _input(metadata: dict, path: Path) -> dict:
    return _data_format(metadata, path, "inputs")


def _divisible_by(metadata: dict, network_def: dict, path: Path) -> int:
    """From metadata's 'spatial_shape' written as "16*n", else the product of a UNet-style `strides` list."""
    shape = _input(metadata, path).get("spatial_shape", [])
    for size in shape if isinstance(shape, list) else []:
        match = re.fullmatch(r"\s*(\d+)\s*\*\s*n\s*", str(size))
        if match:
            return int(match.group(1))
    strides = network_def.get("strides") if isinstance(network_def, dict) else None
    product = 1
    for stride in strides if isinstance(strides, list) and all(isinstance(s, int) for s in strides) else []:
        product *= stride
    return product


def _training_patch(folder: Path) -> list[int] | None:
    """The crop size of the bundle's training config, if it has one: the patch adaptation trains on."""
    path = folder / TRAIN_CONFIG
    if not path.is_file():
        return None
    config = _load(path)
    crops = [t for t in _transforms(config, path, "train") if t["_target_"].rsplit(".", 1)[-1] in TRAINING_CROPS]
    size = _plain(crops[0].get("spatial_size") or crops[0].get("roi_size"), "train crop spatial_size", path) \
        if crops else None
    return None if size is None else list(desc.sizes(size, path, "train crop spatial_size"))


def _spacing(transform: dict | None, path: Path, dims: int) -> tuple[float, ...] | None:
    """Spacingd's `pixdim`: one number per axis, or one number for all (as MONAI takes it)."""
    field = f"{SPACING}.pixdim"
    pixdim = _plain(transform.get("pixdim"), field, path) if transform else None
    if not pixdim:
        return None
    if isinstance(pixdim, (int, float)) and not isinstance(pixdim, bool):
        pixdim = [pixdim] * dims
    return desc.spacing(pixdim, path, field, (dims,))


def bundle_card(folder: Path, model_id: str | None = None) -> ModelCard:
    """The card of a bundle, from its config files alone (nothing instantiated, torch not needed)."""
    path = config_path(folder)
    if path is None:
        raise ModelError(f"{folder / CONFIG_NAMES[0]}: file is missing")
    metadata_path = folder / METADATA
    config, metadata = _load(path), _load(metadata_path)
    transforms = _transforms(config, path)
    orientation = _named(transforms, ORIENTATION)
    input_info = _input(metadata, metadata_path)
    inferer = desc.mapping(_expand(config.get("inferer", {}), config, path), path, "inferer")
    roi = _plain(inferer.get("roi_size") or input_info.get("spatial_shape"), "inferer#roi_size", path)
    if roi is None:
        raise ModelError(f"{path}: key 'inferer#roi_size' is missing")
    roi = list(desc.sizes(roi, path, "inferer#roi_size"))
    network_def = _expand(config.get("network_def", {}), config, path)
    declared = network_def.get("spatial_dims", len(roi)) if isinstance(network_def, dict) else len(roi)
    if declared != len(roi):
        raise ModelError(f"{path}: 'network_def#spatial_dims' is {declared!r} but 'inferer#roi_size' {roi} has "
                         f"{len(roi)} entries")
    axcodes = _plain(orientation.get("axcodes", ""), f"{ORIENTATION}.axcodes", path) if orientation else ""
    channels_field = "network_data_format#inputs#image#num_channels"
    weights = weights_path(folder)
    return ModelCard(
        id=model_id or f"bundle-{metadata.get('name', folder.name)}".replace(" ", "_"),
        title=str(metadata.get("name", folder.name)),
        description=str(metadata.get("description", metadata.get("task", ""))),
        modality=str(input_info.get("modality", "unknown")),
        input_channels=desc.integer(input_info.get("num_channels", 1), metadata_path, channels_field, minimum=1),
        spacing=_spacing(_named(transforms, SPACING), path, len(roi)),
        orientation=desc.axcodes(axcodes, path, f"{ORIENTATION}.axcodes") if len(roi) == 3 else str(axcodes),
        normalization=_normalization(transforms, path),
        patch_size=tuple(_training_patch(folder) or roi),
        inference_roi=tuple(roi),
        labels=_labels(metadata, metadata_path),
        license=str(metadata.get("license", metadata.get("copyright", "see the bundle's LICENSE"))),
        source=str(folder),
        version=str(metadata.get("version", "1")),
        divisible_by=_divisible_by(metadata, network_def, metadata_path),
        citation="; ".join(metadata.get("references", [])) if isinstance(metadata.get("references"), list) else "",
        extra={"format": "monai_bundle",
               **({FIXED_INPUT_SIZE: True} if isinstance(network_def, dict) and "img_size" in network_def else {}),
               **({TORCHSCRIPT: True} if weights is not None and weights.suffix == ".ts" else {})},
        spatial_dims=len(roi),
        channel_names=_channel_names(input_info, metadata_path, channels_field),
        described_in=str(path),
    )


def check_bundle(folder: Path) -> None:
    """Raise the ModelError loading would: an unsafe `network_def`, or a TorchScript file the user has not trusted.

    Nothing is instantiated or loaded (listing models calls this)."""
    weights = weights_path(folder)
    if weights is not None and weights.suffix == ".ts":
        require_trusted(weights)
    else:
        path, network_def = _network_def(folder)
        _network(network_def, path, "network_def", build=False)


def build_network(folder: Path):
    """Instantiate `network_def` alone, once the whole tree passed the check (nothing is built before)."""
    path, network_def = _network_def(folder)
    _network(network_def, path, "network_def", build=False)
    return _network(network_def, path, "network_def", build=True)


def declared_out_channels(folder: Path) -> int | None:
    """`network_def`'s `out_channels` (MONAI's networks name their output channels so), if it says."""
    channels = _network_def(folder)[1].get("out_channels")
    return channels if isinstance(channels, int) and not isinstance(channels, bool) else None


def load_bundle(folder: str | Path, model_id: str | None = None) -> FoundationModel:
    """Eager network + state dict where the bundle has one; a TorchScript bundle gives a scripted network."""
    from ..adapters.io import fingerprint
    from .output_channels import probed_channels, refuse_label_mismatch
    from .safe_load import load_into, load_state_dict_file

    folder = Path(folder)
    card = bundle_card(folder, model_id)
    weights = weights_path(folder)
    if weights is None:
        raise ModelError(f"{folder / WEIGHT_NAMES[1]}: file is missing (nor model.safetensors / model.ts)")
    if weights.suffix == ".ts":
        network = load_trusted_torchscript(weights).eval()
        refuse_label_mismatch(probed_channels(network, card), card, folder / METADATA)
    else:
        network = load_into(build_network(folder), load_state_dict_file(weights), weights)
        refuse_label_mismatch(declared_out_channels(folder), card, folder / METADATA)
    files = {"config": str(config_path(folder)), "metadata": str(folder / METADATA), "weights": str(weights)}
    return FoundationModel(network.eval(), card, fingerprint(network), files)
