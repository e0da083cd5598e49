"""Untrusted model folders cannot run code: MONAI bundle configs may only build network classes, and TorchScript (a
program) runs only once the user trusted its exact bytes. Weight pickles and adapters are data: refused in one line
naming the file, before the network changes or any inference runs.

Every payload here is real and would act if it ran: a config gadget that creates a marker file, a scripted module
that overwrites a victim file through `torch.from_file` when run — or already when loaded (`__setstate__`). Each test
proves the payload did not act, and the trusted cases prove it would have.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from safetensors.torch import load_file, save_file

from conftest import shared
from test_model_loaders import _RunsCode, _write_bundle
from PEFTAdaptLib.adapters import LoRAConfig, add_units, iter_units, load_adapters, save_adapters, unit_class_for
from PEFTAdaptLib.adapters.base import base_layer_names
from PEFTAdaptLib.cli import main
from PEFTAdaptLib.errors import ModelError
from PEFTAdaptLib.models.card import LabelInfo, ModelCard
from PEFTAdaptLib.models.registry import list_models, load_model
from PEFTAdaptLib.models.safe_load import sha256_file
from PEFTAdaptLib.models.trust import HOME_ENV, store_path

PEFTADAPT = Path(sys.executable).with_name("peftadapt.exe" if sys.platform == "win32" else "peftadapt")
SPINE_T2 = "spine/t2/t2.nii.gz"
PRECIOUS = b"precious data\n"


@pytest.fixture(autouse=True)
def own_trust_store(tmp_path, monkeypatch):
    """Each test starts with an empty trust store of its own (never the user's)."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(PEFTADAPT), *args], capture_output=True, text=True, timeout=600, env=dict(os.environ))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("peftadapt: error:"), result.stderr
    return lines[0]


# --- 1: MONAI bundle configs ------------------------------------------------------------------------------------------


def _unet(**extra) -> dict:
    return {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8, 16],
            "strides": [2, 2], "num_res_units": 1, "norm": "batch", **extra}


def _gadgets(marker: Path) -> dict[str, dict]:
    """network_def values that each run `touch marker` (or worse) if MONAI's parser instantiates them."""
    touch = ["touch", str(marker)]
    run_cmd = {"_target_": "monai.utils.misc.run_cmd", "cmd_list": touch}
    return {
        "run_cmd": run_cmd,
        "run_cmd_bare_name": {"_target_": "run_cmd", "cmd_list": touch},
        "run_cmd_in_a_network_argument": _unet(act=run_cmd),
        "run_cmd_in_requires": _unet(_requires_=run_cmd),
        "run_cmd_in_call": _unet(_call_=run_cmd),
        "monai_networks_function_writing_a_file": {"_target_": "monai.networks.utils.save_state", "src": {},
                                                   "path": str(marker)},
        "os_system": {"_target_": "os.system", "command": f"touch {marker}"},
        "subprocess": {"_target_": "subprocess.run", "args": touch},
        "expression_argument": _unet(out_channels=f"$__import__('os').system('touch {marker}') or 2"),
        "expression_target": {"_target_": f"$__import__('os').system('touch {marker}')"},
        "expression_in_requires": _unet(_requires_=f"$__import__('os').system('touch {marker}')"),
        "reference_to_an_expression": _unet(out_channels="@payload"),
        "macro_from_another_file": _unet(out_channels=f"%{marker}.json#n"),
        "mode_callable": _unet(_mode_="callable"),
        "download_pretrained_weights": {"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1,
                                        "out_channels": 2, "pretrained": True},
    }


def _write_gadget_bundle(folder: Path, network_def: dict, marker: Path) -> None:
    _write_bundle(folder, network_def=network_def)
    config_file = folder / "configs" / "inference.json"
    config = json.loads(config_file.read_text())
    config["payload"] = f"$__import__('os').system('touch {marker}') or 2"
    config_file.write_text(json.dumps(config))


GADGETS = list(_gadgets(Path("m")))


@pytest.mark.parametrize("gadget", GADGETS)
def test_bundle_gadget_is_refused_unexecuted_and_not_listed_as_available(tmp_path, monkeypatch, gadget):
    marker = tmp_path / "pwned"
    models = tmp_path / "models"
    _write_gadget_bundle(models / gadget, _gadgets(marker)[gadget], marker)
    with pytest.raises(ModelError, match="refused") as error:
        load_model(models / gadget)
    assert "inference.json" in str(error.value) and "network_def" in str(error.value)
    monkeypatch.setenv("PEFTADAPT_MODELS", str(models))
    status = {row.id: row.status for row in list_models()[0]}
    assert status[gadget] != "available" and "refused" in status[gadget]
    assert not marker.exists()


def test_cli_refuses_a_run_cmd_bundle_in_one_line_and_lists_it_as_refused(tmp_path):
    marker = tmp_path / "pwned"
    bundle = tmp_path / "models" / "evil"
    _write_gadget_bundle(bundle, _gadgets(marker)["run_cmd"], marker)
    line = one_error_line(run_cli("predict", "--model", str(bundle), "--image", str(shared(SPINE_T2)),
                                  "--output", str(tmp_path / "o.nii.gz")))
    assert "refused to import 'monai.utils.misc.run_cmd'" in line
    listing = subprocess.run([str(PEFTADAPT), "models"], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PEFTADAPT_MODELS": str(tmp_path / "models")})
    assert "evil:" in listing.stdout and "status: " in listing.stdout
    assert listing.stdout.count("status: available") == 1  # the built-in model only
    assert not marker.exists()


def test_a_bundle_naming_network_classes_everywhere_still_builds(tmp_path):
    """Plain arguments, `_desc_`, fully qualified and bare class names, and a network block nested as an argument."""
    from monai.networks.blocks import Convolution
    from monai.networks.layers import SkipConnection

    from PEFTAdaptLib.models.monai_bundle import build_network

    _write_bundle(tmp_path / "qualified", network_def={**_unet(), "_target_": "monai.networks.nets.UNet",
                                                       "_desc_": "a small UNet"})
    assert type(load_model(tmp_path / "qualified").network).__name__ == "UNet"
    _write_bundle(tmp_path / "nested", network_def={
        "_target_": "monai.networks.layers.SkipConnection",
        "submodule": {"_target_": "Convolution", "spatial_dims": 3, "in_channels": 1, "out_channels": 1}})
    network = build_network(tmp_path / "nested")
    assert isinstance(network, SkipConnection) and isinstance(network.submodule, Convolution)


# --- 2: TorchScript is code -----------------------------------------------------------------------------------------


class OverwritesWhenRun(nn.Module):
    """Segments like a network, and overwrites `victim` (mapped shared, filled with 'X') on every forward."""

    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        written = torch.from_file(self.victim, True, 8, dtype=torch.uint8).fill_(88)
        return self.conv(x) + 0 * written.sum()


class _Payload(nn.Module):
    def __init__(self, victim: str):
        super().__init__()
        self.victim = victim
        self.mark = 0

    def forward(self, x):
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.victim, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.victim = state[0]
        self.training = state[1]
        self.mark = int(torch.from_file(self.victim, True, 8, dtype=torch.uint8).fill_(77).sum())


class OverwritesWhenLoaded(nn.Module):
    """Overwrites `victim` as soon as `torch.jit.load` reads the file (its submodule's `__setstate__`)."""

    def __init__(self, victim: str):
        super().__init__()
        self.payload = _Payload(victim)
        self.conv = nn.Conv3d(1, 2, 1)

    def forward(self, x):
        return self.conv(self.payload(x))


def _card(model_id: str) -> ModelCard:
    return ModelCard(id=model_id, title="scripted test model", description="", modality="MR", input_channels=1,
                     spacing=None, orientation="", normalization={"name": "zscore"}, patch_size=(16, 16, 16),
                     inference_roi=(16, 16, 16), labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")],
                     license="test", source="test")


def _scripted_model(folder: Path, module: nn.Module) -> Path:
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(folder / "model.ts"))
    _card(folder.name).save(folder / "model.card.json")
    return folder / "model.ts"


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(PRECIOUS)
    return victim


@pytest.mark.parametrize("payload", [OverwritesWhenRun, OverwritesWhenLoaded])
def test_untrusted_torchscript_is_refused_unloaded_and_runs_once_trusted(tmp_path, monkeypatch, payload):
    victim = _victim(tmp_path)
    network_file = _scripted_model(tmp_path / "models" / "scripted", payload(str(victim)))
    digest = sha256_file(network_file)
    with pytest.raises(ModelError) as error:
        load_model(network_file.parent)
    message = str(error.value)
    assert str(network_file) in message and digest in message and f"peftadapt trust {network_file}" in message
    monkeypatch.setenv("PEFTADAPT_MODELS", str(tmp_path / "models"))
    status = {row.id: row.status for row in list_models()[0]}
    assert "refused to load TorchScript" in status["scripted"]
    assert victim.read_bytes() == PRECIOUS
    # trusted: the same file loads and runs, and its payload acts — the trust decision is what stood in between
    assert main(["trust", str(network_file.parent)]) == 0
    assert digest in store_path().read_text()
    assert {row.id: row.status for row in list_models()[0]}["scripted"] == "available"
    model = load_model(network_file.parent)
    with torch.no_grad():
        model.network(torch.zeros(1, 1, 4, 4, 4))
    assert victim.read_bytes() != PRECIOUS
    # trust is for those bytes only: a changed file is refused again
    victim.write_bytes(PRECIOUS)
    torch.jit.save(torch.jit.script(payload(str(tmp_path / "other.txt"))), str(network_file))
    with pytest.raises(ModelError, match="refused to load TorchScript"):
        load_model(network_file.parent)
    assert victim.read_bytes() == PRECIOUS


def test_a_bundles_torchscript_is_refused_until_trusted(tmp_path):
    victim = _victim(tmp_path)
    folder = tmp_path / "bundle_ts"
    _write_bundle(folder)
    (folder / "models" / "model.pt").unlink()
    torch.jit.save(torch.jit.script(OverwritesWhenLoaded(str(victim))), str(folder / "models" / "model.ts"))
    with pytest.raises(ModelError, match=r"model\.ts: refused to load TorchScript \(sha256 [0-9a-f]{64}\)"):
        load_model(folder)
    assert victim.read_bytes() == PRECIOUS
    assert main(["trust", str(folder)]) == 0
    load_model(folder)
    assert victim.read_bytes() != PRECIOUS


def test_cli_predict_refuses_untrusted_torchscript_and_trust_prints_the_file_and_hash(tmp_path):
    victim = _victim(tmp_path)
    network_file = _scripted_model(tmp_path / "scripted", OverwritesWhenRun(str(victim)))
    digest = sha256_file(network_file)
    predict = ("predict", "--model", str(network_file.parent), "--image", str(shared(SPINE_T2)),
               "--output", str(tmp_path / "cord.nii.gz"))
    line = one_error_line(run_cli(*predict))
    assert digest in line and f"peftadapt trust {network_file}" in line
    assert victim.read_bytes() == PRECIOUS and not (tmp_path / "cord.nii.gz").exists()
    trusted = run_cli("trust", str(network_file))
    assert trusted.returncode == 0 and str(network_file) in trusted.stdout and digest in trusted.stdout
    assert str(tmp_path / "home") in trusted.stdout  # the store is the user's config folder, not the model's
    assert run_cli(*predict).returncode == 0 and (tmp_path / "cord.nii.gz").exists()
    assert victim.read_bytes() != PRECIOUS
    assert "holds no TorchScript" in one_error_line(run_cli("trust", str(tmp_path / "home")))


def test_the_builtin_model_needs_no_trust_because_its_files_are_pinned():
    rows, _ = list_models(Path("/nonexistent"))
    assert rows[0].id == "deepbet-brain" and rows[0].status == "available"
    assert not store_path().exists()


# --- 3: weight pickles and adapters are data -------------------------------------------------------------------------


def test_a_pickle_that_would_run_code_is_refused_in_one_line_without_torchs_advice(tmp_path):
    """torch's refusal text advises re-running with `weights_only=False`, which would run the payload; the refusal
    is one line naming the file and the global the pickle asked for."""
    marker, bundle = tmp_path / "pwned", tmp_path / "evil_pickle"
    _write_bundle(bundle)
    torch.save({"state_dict": _RunsCode(marker)}, bundle / "models" / "model.pt")
    with pytest.raises(ModelError) as refused:
        load_model(bundle)
    message = str(refused.value)
    assert message.startswith(f"{bundle / 'models' / 'model.pt'}: refused to load") and "\n" not in message
    assert "GLOBAL posix.system" in message or "GLOBAL nt.system" in message
    assert "weights_only" not in message and not marker.exists()


def test_a_torchscript_archive_given_as_weights_is_one_line_before_torch_reads_it(tmp_path):
    """Found verifying the model-folder fixes: a TorchScript archive named model.pt was refused in torch's paragraph
    (with its advice to retry with weights_only=False) after a warning; it is a program, said in one line."""
    from PEFTAdaptLib.models.safe_load import load_checkpoint

    torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(tmp_path / "model.pt"))
    with warnings.catch_warnings(record=True) as warned, pytest.raises(ModelError) as refused:
        warnings.simplefilter("always")
        load_checkpoint(tmp_path / "model.pt")
    message = str(refused.value)
    assert "a TorchScript program, not a weights file" in message and "\n" not in message
    assert "weights_only" not in message and not warned
    torch.save({"weight": torch.ones(2)}, tmp_path / "weights.pt")  # plain weights still load
    assert torch.equal(load_checkpoint(tmp_path / "weights.pt")["weight"], torch.ones(2))


@pytest.mark.parametrize("kept", [0.5, 0.01])
def test_a_truncated_checkpoint_is_said_to_be_damaged_in_one_line(tmp_path, kept):
    """Found checking model folders: a cut-short .pth said only '([Errno 22] Invalid argument)' (or torch's paragraph
    on miniz internals, shorter still)."""
    from PEFTAdaptLib.models.safe_load import load_checkpoint

    torch.save({"weight": torch.randn(100, 100)}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[:int(len(data) * kept)])
    with pytest.raises(ModelError) as refused:
        load_checkpoint(tmp_path / "model.pth")
    assert str(refused.value) == (f"{tmp_path / 'model.pth'}: damaged or incomplete — a PyTorch archive whose zip "
                                  "directory cannot be read; copy or download the file again")


@pytest.fixture
def bundle(tmp_path) -> Path:
    """A small real MONAI bundle (test_model_loaders' UNet) that segments the spine T2 volume in seconds."""
    _write_bundle(tmp_path / "spleen")
    return tmp_path / "spleen"


def lora_layers(network: nn.Module) -> list[str]:
    """The first two convolutions a LoRA unit can adapt: the adapters below hold two units."""
    return base_layer_names(network, unit_class_for(LoRAConfig()).layer_types)[:2]


@pytest.fixture
def adapter(bundle, tmp_path) -> Path:
    """A real two-unit LoRA adapter of `bundle`, saved as a job saves one."""
    model = load_model(bundle)
    config = LoRAConfig(r=2, alpha=2)
    add_units(model.network, config, unit_class_for(config), "lora", layers=lora_layers(model.network))
    return save_adapters(model.network, tmp_path / "adapter", model.base_fingerprint, {"model": "spleen"})


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_tensors(adapter: Path, change) -> None:
    """Rewrite adapter.safetensors with `change(name, tensor)` for each tensor (adapter.json untouched)."""
    tensors = load_file(str(adapter / "adapter.safetensors"))
    save_file({name: change(name, tensor) for name, tensor in tensors.items()}, str(adapter / "adapter.safetensors"))


def snapshot(network: nn.Module) -> tuple:
    """Everything loading an adapter could change: module types, tensors and their gradient flags."""
    return ([(name, type(module)) for name, module in network.named_modules()],
            {name: tensor.clone() for name, tensor in network.state_dict().items()},
            [(name, p.requires_grad) for name, p in network.named_parameters()])


def assert_unchanged(network: nn.Module, before: tuple) -> None:
    modules, tensors, flags = snapshot(network)
    assert modules == before[0] and flags == before[2] and not list(iter_units(network))
    assert tensors.keys() == before[1].keys() and all(torch.equal(tensors[k], before[1][k]) for k in tensors)


def refused_load(bundle: Path, adapter: Path) -> str:
    """Load `adapter` onto a fresh copy of `bundle`'s model: the one-line refusal, the network left as it was."""
    model = load_model(bundle)
    before = snapshot(model.network)
    with pytest.raises(ModelError) as refused:
        load_adapters(model.network, adapter, model.base_fingerprint)
    assert "\n" not in str(refused.value)
    assert_unchanged(model.network, before)
    return str(refused.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_an_adapter_with_non_finite_tensors_is_refused_naming_the_file_and_unit(bundle, adapter, value):
    second = lora_layers(load_model(bundle).network)[1]
    edit_tensors(adapter, lambda name, t: torch.full_like(t, value) if name.startswith(f"{second}::") else t)
    message = refused_load(bundle, adapter)
    assert message.startswith(f"{adapter / 'adapter.safetensors'}: unit {second}/lora: holds NaN or infinite")


def test_cli_predict_refuses_a_nan_adapter_before_inference_and_writes_nothing(bundle, adapter, tmp_path):
    edit_tensors(adapter, lambda name, t: torch.full_like(t, float("nan")))
    output = tmp_path / "out" / "seg.nii.gz"
    line = one_error_line(run_cli("predict", "--model", str(bundle), "--adapter", str(adapter), "--image",
                                  str(shared(SPINE_T2)), "--output", str(output)))
    assert f"{adapter / 'adapter.safetensors'}: unit " in line and "NaN or infinite" in line
    assert not output.parent.exists() or not list(output.parent.iterdir())


def test_cli_predict_whose_result_is_unusable_leaves_the_users_files_as_they_were(bundle, adapter, tmp_path):
    """Finite but huge tensors pass the load and make the network's output NaN: the label map and its uncertainty
    files are all refused before any is written, and the message names the user's output, not the scratch folder
    (gone by then)."""
    edit_tensors(adapter, lambda name, t: torch.full_like(t, 1e30))
    output = tmp_path / "out" / "seg.nii.gz"
    output.parent.mkdir()
    output.write_bytes(b"an earlier result")
    result = run_cli("predict", "--model", str(bundle), "--adapter", str(adapter), "--image", str(shared(SPINE_T2)),
                     "--output", str(output))
    errors = [line for line in result.stderr.splitlines() if line.startswith("peftadapt: error:")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr  # after the audit's warning about the volume
    assert errors[0].startswith(f"peftadapt: error: {output}: nothing written: ") and "NaN or infinite" in errors[0]
    assert "peftadapt-predict-" not in result.stderr
    assert [p.name for p in output.parent.iterdir()] == ["seg.nii.gz"]
    assert output.read_bytes() == b"an earlier result"


@pytest.mark.parametrize("field, value, fragment", [
    ("r", "x", "config field 'r' must be a whole number, not 'x'"),
    ("r", -1, "LoRA rank must be ≥ 1, got -1"),
    ("r", 2.5, "config field 'r' must be a whole number"),
    ("alpha", float("nan"), "config field 'alpha' must be a finite number"),
    ("init", "bogus", "unknown LoRA init 'bogus'"),
])
def test_a_bad_unit_config_is_one_line_naming_the_file_and_unit_and_changes_nothing(bundle, adapter, field, value,
                                                                                     fragment):
    """The bad unit is the last one, so a loader that adds units as it goes would have changed the network."""
    edit_json(adapter / "adapter.json", lambda config: config["units"][-1]["config"].__setitem__(field, value))
    message = refused_load(bundle, adapter)
    second = lora_layers(load_model(bundle).network)[1]
    assert message.startswith(f"{adapter / 'adapter.json'}: invalid unit {second}/lora (") and fragment in message


def test_cli_predict_with_a_bad_unit_config_is_one_line(bundle, adapter, tmp_path):
    edit_json(adapter / "adapter.json", lambda config: config["units"][-1]["config"].__setitem__("r", "x"))
    line = one_error_line(run_cli("predict", "--model", str(bundle), "--adapter", str(adapter), "--image",
                                  str(shared(SPINE_T2)), "--output", str(tmp_path / "seg.nii.gz")))
    assert f"{adapter / 'adapter.json'}: invalid unit " in line and "config field 'r'" in line


def test_an_adapter_tensor_of_the_wrong_shape_is_one_line_with_names_and_shapes(bundle, adapter):
    first = lora_layers(load_model(bundle).network)[0]
    edit_tensors(adapter, lambda name, t: torch.zeros(3, 3) if name == f"{first}::lora::lora_A" else t)
    message = refused_load(bundle, adapter)
    assert message.startswith(f"{adapter / 'adapter.safetensors'}: unit {first}/lora: its tensors do not fit it")
    assert "lora_A (3, 3) ≠ (2, " in message


def test_an_adapter_without_a_base_fingerprint_says_the_field_is_missing(bundle, adapter):
    edit_json(adapter / "adapter.json", lambda config: config.pop("base_fingerprint"))
    message = refused_load(bundle, adapter)
    assert message.startswith(f"{adapter / 'adapter.json'}: the base model's fingerprint ('base_fingerprint') is "
                              "missing") and "None" not in message
