"""Figures (prediction overlays, attention maps, curves) and the self-contained HTML report."""
