"""The pipeline stages, one package or module each; each is a `python -m nsdprep` command."""
