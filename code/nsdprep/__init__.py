"""nsdprep: build the NSD + COCO decoding dataset reproducibly, stage by stage.

Stages, one module each (make target in brackets): ``inputs`` (URL-registered DataLad subdatasets;
``make inputs``), ``coco`` (labels; ``make coco-labels``), ``resample`` (3 mm; ``make 3mm``),
``curate`` (``make curated``), ``decode`` (``make decode``). Around them: ``nsd`` (the NSD domain:
paths, layout, design file), ``dataset`` (the one adapter to git, git-annex and DataLad), ``steps``
(``datalad run`` records of each target), ``publish`` (RIA store), ``provenance``, ``errors``.
:mod:`nsdprep.testing` holds the synthetic data, the loopback mirror and the demo driver.
Nothing is done at import time.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_curated"]


def __getattr__(name: str) -> Any:
    """``nsdprep.load_curated`` without importing its dependencies at ``import nsdprep``."""
    if name == "load_curated":
        from nsdprep.load import load_curated

        return load_curated
    raise AttributeError(f"module 'nsdprep' has no attribute {name!r}")
