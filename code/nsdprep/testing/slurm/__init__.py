"""Test infrastructure for SLURM: a throw-away single-node cluster and a FAIRly-big proof of concept.

- :mod:`.cluster`: ``SlurmCluster(workdir)``, a context manager running munged, slurmctld and slurmd.
- :mod:`.fairlybig_poc`: one job array in the FAIRly-big pattern (``fairlybig_job.sh``,
  ``fairlybig_merge.sh``) on that cluster, checked end to end.

See ``README.md`` in this folder for commands, measured times and pitfalls.
"""
