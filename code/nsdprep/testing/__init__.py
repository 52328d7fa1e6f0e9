"""Support for the demo and the tests; not pipeline stages.

Synthetic data in the real formats (:mod:`~nsdprep.testing.synth`), a loopback S3-like mirror
(:mod:`~nsdprep.testing.serve`), the original nilearn processing as an oracle
(:mod:`~nsdprep.testing.reference`) and the demo driver (:mod:`~nsdprep.testing.demo`).
"""
