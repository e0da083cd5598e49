"""nnU-Net v2 trained-model folders (the format TotalSegmentator and most nnU-Net releases ship).

Layout: `dataset.json` (channel names, labels name → value), `plans.json` (per-configuration spacing, patch size,
normalisation, network architecture) and `fold_k/checkpoint_final.pth` (a dict whose `network_weights` is the state
dict). The network is rebuilt with `dynamic_network_architectures` — only classes from that package and layer types
from `torch.nn` are accepted from the plans, so a plans file cannot name arbitrary code to run.

Axes: nnU-Net works on SimpleITK's (z, y, x) array permuted by `transpose_forward`, and its spacings and patch sizes
are in that order; PEFTAdapt arrays are (x, y, z). The network is wrapped in a fixed axis permutation, and the card's
spacing and patch size are given in PEFTAdapt's order.
"""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..jsonfile import read_json
from . import description as desc
from .card import LabelInfo, ModelCard
from .foundation import FoundationModel
from .network_classes import import_network_class

DATASET_JSON = "dataset.json"
PLANS_JSON = "plans.json"
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
ARCHITECTURE_PACKAGE = "dynamic_network_architectures.architectures."
#: plans written before nnU-Net 2.4 name the U-Net by short class name
LEGACY_CLASSES = {"PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                  "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"}


def checkpoint_path(folder: Path, fold: str | None) -> Path | None:
    folds = [folder / f"fold_{fold}"] if fold is not None else sorted(folder.glob("fold_*"))
    for fold_dir in folds:
        for name in CHECKPOINTS:
            if (fold_dir / name).is_file():
                return fold_dir / name
    return None


def is_nnunet_folder(folder: Path) -> bool:
    return (folder / DATASET_JSON).is_file() and (folder / PLANS_JSON).is_file()


def configuration_name(folder: Path, plans: dict) -> str:
    """From the trained-model folder name `Trainer__Plans__configuration`, else the only/3d_fullres configuration."""
    configurations = desc.mapping(plans.get("configurations", {}), folder / PLANS_JSON, "configurations")
    parts = folder.name.split("__")
    if len(parts) == 3 and parts[2] in configurations:
        return parts[2]
    if "3d_fullres" in configurations or len(configurations) != 1:
        return "3d_fullres"
    return next(iter(configurations))


def _configuration(plans: dict, name: str, path: Path, chain: tuple[str, ...] = ()) -> dict:
    """A configuration with its `inherits_from` chain resolved (e.g. 3d_cascade_fullres builds on 3d_fullres)."""
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not isinstance(name, str) or name not in configurations:
        raise ModelError(f"{path}: no configuration '{name}' under 'configurations'")
    if name in chain:
        raise ModelError(f"{path}: 'inherits_from' goes round in a circle ({' → '.join((*chain, name))})")
    config = dict(desc.mapping(configurations[name], path, f"configurations.{name}"))
    parent = config.pop("inherits_from", None)
    return {**_configuration(plans, parent, path, (*chain, name)), **config} if parent else config


def _need(mapping: dict, key: str, path: Path, where: str = "") -> Any:
    if key not in mapping:
        raise ModelError(f"{path}: key '{key}' is missing{where}")
    return mapping[key]


def _axis_order(plans: dict, path: Path) -> list[int]:
    """For each network axis, the PEFTAdapt (x, y, z) axis it reads."""
    transpose = plans.get("transpose_forward", [0, 1, 2])
    if not isinstance(transpose, list) or sorted(transpose) != [0, 1, 2] or any(isinstance(a, bool) for a in transpose):
        raise desc.refusal(path, "transpose_forward", "a permutation of 0, 1, 2 (each axis once)", transpose)
    return [2 - axis for axis in transpose]


def _in_our_order(values: list, order: list[int]) -> tuple:
    ours = [None] * 3
    for network_axis, our_axis in enumerate(order):
        ours[our_axis] = values[network_axis]
    return tuple(ours)


def _normalization(plans: dict, config: dict, path: Path) -> dict:
    schemes = desc.sequence(_need(config, "normalization_schemes", path, " in the configuration"), path,
                            "normalization_schemes")
    if len(set(map(str, schemes))) != 1:
        raise ModelError(f"{path}: per-channel normalisation schemes {schemes} are not supported (one scheme for all)")
    scheme = schemes[0]
    use_mask = bool((desc.sequence(config.get("use_mask_for_norm", [False]), path, "use_mask_for_norm") or [False])[0])
    if scheme == "CTNormalization":
        properties = desc.mapping(_need(plans, "foreground_intensity_properties_per_channel", path), path,
                                  "foreground_intensity_properties_per_channel")
        channel = properties.get("0") or _need(properties, "0", path, " in foreground_intensity_properties_per_channel")
        try:
            return {"name": "ct_zscore", "lower": channel["percentile_00_5"], "upper": channel["percentile_99_5"],
                    "mean": channel["mean"], "std": channel["std"]}
        except KeyError as exc:
            raise ModelError(f"{path}: key {exc} is missing in foreground_intensity_properties_per_channel") from None
    if scheme == "ZScoreNormalization":
        return {"name": "zscore", "nonzero": 0} if use_mask else {"name": "zscore"}
    if scheme == "NoNormalization":
        return {"name": "none"}
    if scheme == "RescaleTo01Normalization":
        return {"name": "minmax"}
    if scheme == "RGBTo01Normalization":
        return {"name": "clip_scale", "lower": 0, "upper": 255}
    raise ModelError(f"{path}: normalisation scheme '{scheme}' is not supported")


def _labels(dataset: dict, path: Path) -> list[LabelInfo]:
    labels = desc.mapping(_need(dataset, "labels", path), path, "labels")
    if any(not isinstance(value, int) for value in labels.values()):
        raise ModelError(f"{path}: region-based labels (lists of values) are not supported; labels must be integers")
    ordered = sorted(labels.items(), key=lambda item: item[1])
    if [value for _, value in ordered] != list(range(len(ordered))):
        raise ModelError(f"{path}: label values must be 0, 1, 2, … without gaps (nnU-Net requires it too)")
    infos = []
    for name, value in ordered:
        hue = (value * 0.618034) % 1.0  # golden-ratio hues: neighbouring labels get distinct colours
        color = (0.0, 0.0, 0.0) if value == 0 else colorsys.hsv_to_rgb(hue, 0.65, 0.9)
        infos.append(LabelInfo(value, name, tuple(round(c, 3) for c in color)))
    return infos


def nnunet_card(folder: Path, model_id: str | None = None) -> ModelCard:
    """The card of an nnU-Net folder, from the JSON files alone (no torch, no checkpoint read)."""
    dataset_path, plans_path = folder / DATASET_JSON, folder / PLANS_JSON
    dataset = read_json(dataset_path, "nnU-Net dataset description", ModelError)
    plans = read_json(plans_path, "nnU-Net plans", ModelError)
    name = configuration_name(folder, plans)
    config = _configuration(plans, name, plans_path)
    order = _axis_order(plans, plans_path)
    where = f"configurations.{name}"
    patch = _need(config, "patch_size", plans_path, f" in configuration '{name}'")
    if isinstance(patch, list) and len(patch) != 3:
        raise ModelError(f"{plans_path}: configuration '{name}' is not 3D (patch size {patch})")
    patch = _in_our_order(desc.sizes(patch, plans_path, f"{where}.patch_size", (3,)), order)
    spacing = desc.spacing(_need(config, "spacing", plans_path, f" in configuration '{name}'"), plans_path,
                           f"{where}.spacing", (3,))
    spacing = _in_our_order(spacing, order)
    channels = desc.mapping(dataset.get("channel_names") or _need(dataset, "modality", dataset_path), dataset_path,
                            "channel_names")
    reader = plans.get("image_reader_writer", "SimpleITKIO")
    strides = _strides(config, plans_path)
    divisible = max(_product([s[axis] for s in strides]) for axis in range(3))
    return ModelCard(
        id=model_id or f"nnunet-{folder.name}",
        title=f"nnU-Net {plans.get('dataset_name', folder.parent.name)} ({name})",
        description=f"nnU-Net v2 model, plans '{plans.get('plans_name', '?')}', configuration '{name}'.",
        modality=", ".join(str(v) for v in channels.values()),
        input_channels=len(channels),
        spacing=spacing,
        orientation="RAS" if reader == "NibabelIOWithReorient" else "",
        normalization=_normalization(plans, config, plans_path),
        patch_size=patch,
        inference_roi=patch,
        labels=_labels(dataset, dataset_path),
        license=str(dataset.get("licence", dataset.get("license", "see the model's release"))),
        source=str(folder),
        divisible_by=divisible,
        extra={"format": "nnunet_v2", "configuration": name, "axis_order": order, "image_reader_writer": reader},
        channel_names=desc.indexed_names(channels, dataset_path, "channel_names"),
        described_in=str(plans_path),
    )


def _product(values: list[int]) -> int:
    result = 1
    for value in values:
        result *= int(value)
    return result


def _strides(config: dict, path: Path) -> list[list[int]]:
    arch = config.get("architecture")
    strides = desc.mapping(arch.get("arch_kwargs", {}), path, "architecture.arch_kwargs").get("strides") \
        if isinstance(arch, dict) else config.get("pool_op_kernel_sizes")
    if not strides:
        raise ModelError(f"{path}: the configuration names no strides ('architecture.arch_kwargs.strides' or "
                         "'pool_op_kernel_sizes')")
    field = "architecture.arch_kwargs.strides" if isinstance(arch, dict) else "pool_op_kernel_sizes"
    return [list(desc.sizes([s] * 3 if isinstance(s, int) else s, path, f"{field}[{i}]", (3,)))
            for i, s in enumerate(desc.sequence(strides, path, field))]


def _architecture(config: dict, num_inputs: int, num_classes: int, path: Path) -> tuple[type, dict]:
    """(network class, keyword arguments) from new-style `architecture` or the older flat U-Net keys."""
    import torch

    arch = config.get("architecture")
    if isinstance(arch, dict):
        cls = import_network_class(_need(arch, "network_class_name", path, " in 'architecture'"),
                                   (ARCHITECTURE_PACKAGE,), path)
        kwargs = dict(desc.mapping(_need(arch, "arch_kwargs", path, " in 'architecture'"), path,
                                   "architecture.arch_kwargs"))
        for key in desc.sequence(arch.get("_kw_requires_import", []), path, "architecture._kw_requires_import"):
            if isinstance(key, str) and kwargs.get(key) is not None:
                kwargs[key] = import_network_class(kwargs[key], ("torch.nn.",), path)
    else:
        class_name = _need(config, "UNet_class_name", path, " (neither 'architecture' nor 'UNet_class_name')")
        if class_name not in LEGACY_CLASSES:
            raise ModelError(f"{path}: U-Net class '{class_name}' is not supported")
        cls = import_network_class(LEGACY_CLASSES[class_name], (ARCHITECTURE_PACKAGE,), path)
        kernels = _need(config, "conv_kernel_sizes", path)
        base, top = _need(config, "UNet_base_num_features", path), config.get("unet_max_num_features", 320)
        encoder_key = "n_conv_per_stage_encoder" if class_name == "PlainConvUNet" else "n_blocks_per_stage"
        kwargs = {
            "n_stages": len(kernels), "features_per_stage": [min(base * 2 ** i, top) for i in range(len(kernels))],
            "conv_op": torch.nn.Conv3d, "kernel_sizes": kernels, "strides": _need(config, "pool_op_kernel_sizes", path),
            "n_conv_per_stage": _need(config, encoder_key, path), "n_conv_per_stage_decoder":
            _need(config, "n_conv_per_stage_decoder", path), "conv_bias": True, "norm_op": torch.nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": torch.nn.LeakyReLU, "nonlin_kwargs": {"inplace": True},
        }
        if class_name == "ResidualEncoderUNet":
            kwargs["n_blocks_per_stage"] = kwargs.pop("n_conv_per_stage")
    features = kwargs.get("features_per_stage")
    for index, value in enumerate(features if isinstance(features, list) else [features] if features else []):
        desc.integer(value, path, f"features_per_stage[{index}]", minimum=1)
    return cls, {**kwargs, "input_channels": num_inputs, "num_classes": num_classes, "deep_supervision": False}


def _numpy_scalar_globals() -> list:
    """numpy types nnU-Net's training log pickles (float64 scalars): data, not code, so they may be unpickled."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar  # numpy ≥ 2
    except ImportError:
        from numpy.core.multiarray import scalar
    return [scalar, np.dtype, *(getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType"))]


def _network_class(folder: Path, card: ModelCard) -> tuple[type, dict]:
    """The network class and arguments the plans name, each name checked (nothing built)."""
    plans_path = folder / PLANS_JSON
    config = _configuration(read_json(plans_path, "nnU-Net plans", ModelError), card.extra["configuration"], plans_path)
    return _architecture(config, card.input_channels, card.num_classes, plans_path)


def check_nnunet(folder: Path) -> None:
    """Raise the ModelError loading would for the plans' network (a class outside dynamic_network_architectures or
    torch.nn, a bad feature count): JSON and imports only, no checkpoint read, so listing can say it."""
    _network_class(folder, nnunet_card(folder))


def load_nnunet(folder: str | Path, fold: str | None = None, model_id: str | None = None) -> FoundationModel:
    from ..adapters.io import fingerprint
    from .nnunet_network import AxisPermuted
    from .safe_load import load_checkpoint, load_into

    folder = Path(folder)
    card = nnunet_card(folder, model_id)
    weights = checkpoint_path(folder, fold)
    if weights is None:
        where = folder / (f"fold_{fold}" if fold is not None else "fold_*")
        raise ModelError(f"{where}: no {' or '.join(CHECKPOINTS)}")
    cls, kwargs = _network_class(folder, card)
    checkpoint = load_checkpoint(weights, _numpy_scalar_globals())
    state = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{weights}: key 'network_weights' is missing (not an nnU-Net v2 checkpoint)")
    plans_path = folder / PLANS_JSON
    try:
        inner = cls(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(f"{plans_path}: cannot build {cls.__name__} from the plans ({exc})") from None
    load_into(inner, state, weights)
    network = AxisPermuted(inner, card.extra["axis_order"]).eval()
    card.extra["mirroring_axes"] = list(checkpoint.get("inference_allowed_mirroring_axes") or [])
    card.extra["trainer"] = str(checkpoint.get("trainer_name", ""))
    files = {"dataset": str(folder / DATASET_JSON), "plans": str(plans_path), "weights": str(weights)}
    return FoundationModel(network, card, fingerprint(network), files)
