"""The domain and adapter core: NSD paths and formats, NIfTI I/O, grids, the dataset adapter."""
