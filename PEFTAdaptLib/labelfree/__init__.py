"""Label-free adaptation: ConvLoRA + AdaBN self-training against an early segmentation head (docs/labelfree.md)."""
from .esh import (
    ESH_SOURCE_CONFIDENT, ESH_SOURCE_LABELLED, EarlySegmentationHead, FeatureTap, build_head, choose_stage,
    find_encoder_stages, stages_up_to, train_head,
)
from .selftrain import (
    LabelFreeAdaptation, LabelFreeConfig, adapt_label_free, attach_adapters, pseudo_labels, self_training_loss,
)

__all__ = [
    "ESH_SOURCE_CONFIDENT", "ESH_SOURCE_LABELLED", "EarlySegmentationHead", "FeatureTap", "LabelFreeAdaptation",
    "LabelFreeConfig", "adapt_label_free", "attach_adapters", "build_head", "choose_stage", "find_encoder_stages",
    "pseudo_labels", "self_training_loss", "stages_up_to", "train_head",
]
