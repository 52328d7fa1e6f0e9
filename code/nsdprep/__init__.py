"""nsdprep: build the NSD + COCO decoding dataset reproducibly, stage by stage.

- :mod:`nsdprep.options` declares every option once; :mod:`nsdprep.pipeline` describes every make
  target once (one :class:`~nsdprep.pipeline.Stage` record per derivative).
- :mod:`nsdprep.stages`: the stages, each a ``python -m nsdprep`` command that ``datalad run``
  records: ``inputs`` (``make inputs``), ``labels`` (``make coco-labels``), ``resample``
  (``make 3mm``), ``curate`` (``make curated``), ``decode`` (``make decode``).
- :mod:`nsdprep.drive`: what runs them (``build``, ``steps``, ``slurm``, ``publish``, ``repair``).
- :mod:`nsdprep.core`: the NSD domain (``nsd``), NIfTI I/O and grids, the one adapter to git,
  git-annex and DataLad (``dataset``), provenance and errors.
- :mod:`nsdprep.testing`: synthetic data, the loopback mirror and the demo driver.

``nsdprep.load_curated`` opens a curated subject for analysis. Nothing is done at import time.
"""

from typing import Any

from nsdprep.core.provenance import VERSION as __version__

__all__ = ["__version__", "load_curated"]


def __getattr__(name: str) -> Any:
    """``nsdprep.load_curated`` without importing its dependencies at ``import nsdprep``."""
    if name == "load_curated":
        from nsdprep.load import load_curated

        return load_curated
    raise AttributeError(f"module 'nsdprep' has no attribute {name!r}")
