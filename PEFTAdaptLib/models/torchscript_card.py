"""A TorchScript network file with a model card JSON beside it (`model.ts` + `model.card.json` or `card.json`).

TorchScript is a program: loading it runs its `__setstate__`, running it does whatever its graph says (reading and
writing files included). It is loaded only when the user trusted the file's exact bytes (`trust.py`). Its layers
cannot be swapped for adapter layers, so adapters act in weight space through
`adapters.scripted.ScriptedAdapterModel` (see `with_adapter`). The scripted network must return logits
(N, C, x, y, z) for the card's labels, like every foundation model.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .card import ModelCard
from .foundation import FoundationModel
from .trust import load_trusted_torchscript, require_trusted

SUFFIXES = (".ts", ".pt", ".jit")


def _network_file(folder: Path) -> Path | None:
    return next((folder / f"model{s}" for s in SUFFIXES if (folder / f"model{s}").is_file()), None)


def card_path(network_file: Path) -> Path | None:
    """`<stem>.card.json` beside the file, else `card.json` in its folder."""
    candidates = [network_file.with_name(f"{network_file.stem}.card.json"), network_file.with_name("card.json")]
    return next((path for path in candidates if path.is_file()), None)


def is_torchscript_folder(folder: Path) -> bool:
    network = _network_file(folder)
    return network is not None and card_path(network) is not None


def resolve(path: Path) -> tuple[Path, Path]:
    """(network file, card file) for a folder or a network file."""
    network = _network_file(path) if path.is_dir() else path
    if network is None or not network.is_file():
        raise ModelError(f"{path / 'model.ts' if path.is_dir() else path}: TorchScript file is missing")
    card = card_path(network)
    if card is None:
        raise ModelError(f"{network.with_name(network.stem + '.card.json')}: model card is missing (or card.json)")
    return network, card


def check_trusted(path: Path) -> None:
    """Refuse (naming the file, its sha256 and `peftadapt trust`) unless the user trusted this TorchScript file."""
    require_trusted(resolve(path)[0])


def torchscript_card(path: Path, model_id: str | None = None) -> ModelCard:
    card = ModelCard.load(resolve(path)[1])
    if model_id:
        card.id = model_id
    card.extra = {**card.extra, "format": "torchscript"}
    return card


def load_torchscript(path: str | Path, model_id: str | None = None) -> FoundationModel:
    from ..adapters.io import fingerprint
    from .output_channels import probed_channels, refuse_label_mismatch

    network_file, card_file = resolve(Path(path))
    card = torchscript_card(Path(path), model_id)
    network = load_trusted_torchscript(network_file).eval()
    refuse_label_mismatch(probed_channels(network, card), card, card_file)
    return FoundationModel(network, card, fingerprint(network), {"network": str(network_file), "card": str(card_file)})


def with_adapter(model: FoundationModel, config, layers=None) -> FoundationModel:
    """The same model with weight-space adapter units (of `config`'s type) on its scripted Linear/Conv layers."""
    from ..adapters import unit_class_for
    from ..adapters.scripted import ScriptedAdapterModel

    try:
        network = ScriptedAdapterModel(model.network, config, unit_class_for(config), layers)
    except ValueError as exc:
        raise ModelError(f"{model.files.get('network', model.card.id)}: {exc}") from None
    return FoundationModel(network, model.card, model.base_fingerprint, model.files, model.locate)
