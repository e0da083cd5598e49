"""Import a class a model description names, only if it is a network layer class from an allowed package.

Model folders are untrusted: a config naming `os.system` or `monai.utils.misc.run_cmd` as its "network" would run a
command when instantiated. Names are resolved only inside the given packages, and the object found must be a
`torch.nn.Module` subclass defined there (a function, or a class re-exported from elsewhere, is refused).
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import ModelError

INSTALL_HINTS = {"dynamic_network_architectures": " (`pip install --no-deps dynamic-network-architectures`)"}


def import_network_class(dotted: str, prefixes: tuple[str, ...], path: Path, where: str = ""):
    """The `nn.Module` subclass `dotted` names, or a ModelError naming `path` (and `where` in it)."""
    from torch import nn

    at = f" at {where}" if where else ""
    allowed = ", ".join(p.rstrip(".") for p in prefixes)
    if not isinstance(dotted, str) or not dotted.startswith(prefixes):
        raise ModelError(f"{path}: refused to import '{dotted}'{at}: only network classes from {allowed} may be named")
    module_name, _, attribute = dotted.rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing and importlib.util.find_spec(missing) is None:
            raise ModelError(f"{path}: '{dotted}'{at} needs the missing package {missing}"
                             f"{INSTALL_HINTS.get(missing, '')}") from None
        raise ModelError(f"{path}: '{dotted}'{at} does not exist in the installed packages") from None
    except AttributeError:
        raise ModelError(f"{path}: '{dotted}'{at} does not exist in the installed packages") from None
    except ImportError as exc:
        raise ModelError(f"{path}: '{dotted}'{at} cannot be imported ({exc})") from None
    if not (isinstance(value, type) and issubclass(value, nn.Module) and value.__module__.startswith(prefixes)):
        raise ModelError(f"{path}: refused to import '{dotted}'{at}: not a network class of {allowed}")
    return value
