"""Self-supervised pretraining: X-ray augmentations, multi-crop, DINO, the trainer, a method registry."""

from xrayfm.ssl.augment import Pipeline, XrayTransform
from xrayfm.ssl.config import PretrainConfig
from xrayfm.ssl.dino import DinoHead, DinoLoss, DinoMethod, MultiCropNet, update_momentum
from xrayfm.ssl.multicrop import AugmentConfig, MultiCropTransform, collate_crops
from xrayfm.ssl.registry import Progress, SSLMethod, build_method, list_methods, register_method
from xrayfm.ssl.schedules import linear_warmup, warmup_cosine
from xrayfm.ssl.trainer import Trainer, TrainSummary, train

__all__ = [
    "AugmentConfig",
    "DinoHead",
    "DinoLoss",
    "DinoMethod",
    "MultiCropNet",
    "MultiCropTransform",
    "Pipeline",
    "PretrainConfig",
    "Progress",
    "SSLMethod",
    "TrainSummary",
    "Trainer",
    "XrayTransform",
    "build_method",
    "collate_crops",
    "linear_warmup",
    "list_methods",
    "register_method",
    "train",
    "update_momentum",
    "warmup_cosine",
]
