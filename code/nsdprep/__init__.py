"""nsdprep: build the NSD + COCO decoding dataset reproducibly, stage by stage.

Stages (one module each): ``synth`` (synthetic data in the real formats), ``serve`` (loopback S3-like
mirror), ``inputs`` (URL-registered DataLad subdatasets), ``coco`` (labels), ``resample`` (3 mm),
``curate`` (curated_3mm), ``decode`` (baseline decoding). Nothing is done at import time.
"""

__version__ = "0.1.0"
