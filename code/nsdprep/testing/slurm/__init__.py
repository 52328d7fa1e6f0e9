"""Test infrastructure for SLURM: a throw-away single-node cluster and a demo of the backend.

- :mod:`.cluster`: ``SlurmCluster(workdir)``, a context manager running munged, slurmctld and slurmd.
- :mod:`.demo`: ``make 3mm BACKEND=slurm`` and friends played on that cluster, every command printed.

See ``README.md`` in this folder for commands, measured times and pitfalls.
"""
