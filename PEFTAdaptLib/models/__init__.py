"""Foundation models: networks with the model card that says how to feed them."""
from .card import LabelInfo, ModelCard
from .foundation import FoundationModel

__all__ = ["FoundationModel", "LabelInfo", "ModelCard"]
