"""The adaptation methods users can pick: one module each, registered by name (see `base.py`)."""
from .base import (
    DEFAULT_LR, BuildContext, Cases, MethodConfig, MethodError, Plan, make_method, method_class, method_from_dict,
    method_names, register_method,
)
from .budget import Budget, default_budget

#: what a front-end preselects
DEFAULT_METHOD = "sea-peft"

__all__ = [
    "DEFAULT_LR", "DEFAULT_METHOD", "Budget", "BuildContext", "Cases", "MethodConfig", "MethodError", "Plan",
    "default_budget", "make_method", "method_class", "method_from_dict", "method_names", "register_method",
]
