"""Synthetic mobile C-arm studies rendered from CT with exact labels (see docs/synth.md).

Light imports only: the label format and the region taxonomy. The renderer lives in
:mod:`xrayfm.synth.generate` (``SynthConfig``, ``generate``) and its sibling modules.
"""

from xrayfm.synth.labels import SynthLabel, read_labels, write_labels
from xrayfm.synth.regions import REGIONS, region_index

__all__ = ["REGIONS", "SynthLabel", "read_labels", "region_index", "write_labels"]
