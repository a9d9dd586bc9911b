"""xrayfm: an open toolkit for medical X-ray foundation models.

Data flows one way: io -> privacy -> lake -> ssl -> models -> tasks -> report/serve,
with synth producing labelled C-arm studies that enter through the same ingest.
"""

__version__ = "0.1.0"
