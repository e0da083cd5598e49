"""Label-free adaptation: ConvLoRA + AdaBN self-training against an early segmentation head (docs/labelfree.md)."""
from .esh import (
    ESH_SOURCE_CONFIDENT, ESH_SOURCE_LABELLED, EarlySegmentationHead, FeatureTap, build_head, choose_stage,
    find_encoder_stages, stages_up_to, train_head,
)
from .selftrain import (
    AgreementScorer, LabelFreeConfig, LabelFreeParts, LabelFreeStart, SelfTrainingObjective, attach_adapters,
    build_label_free, pseudo_labels, self_training_loss,
)

__all__ = [
    "AgreementScorer", "ESH_SOURCE_CONFIDENT", "ESH_SOURCE_LABELLED", "EarlySegmentationHead", "FeatureTap",
    "LabelFreeConfig", "LabelFreeParts", "LabelFreeStart", "SelfTrainingObjective", "attach_adapters",
    "build_head", "build_label_free", "choose_stage", "find_encoder_stages", "pseudo_labels", "self_training_loss",
    "stages_up_to", "train_head",
]
