"""Backbones (timm, one input channel, pooled + dense features) and backbone bundles."""

from xrayfm.models.backbones import (
    Backbone,
    backbone_spec,
    create_backbone,
    list_backbones,
    load_pretrained,
    register_backbone,
)
from xrayfm.models.card import export_backbone, load_backbone

__all__ = [
    "Backbone",
    "backbone_spec",
    "create_backbone",
    "export_backbone",
    "list_backbones",
    "load_backbone",
    "load_pretrained",
    "register_backbone",
]
