"""Error hierarchy: every message names the file, what was expected, what was found, what to do."""


class NsdPrepError(Exception):
    """Base class of all errors this package raises on purpose."""


class MissingInputError(NsdPrepError):
    """An input file or its content is absent (e.g. not yet ``datalad get``)."""


class FormatError(NsdPrepError):
    """An input exists but does not have the expected format, shape, dtype, grid or fields."""


class RemoteError(NsdPrepError):
    """The data source answered with an error or could not be reached."""


class DatasetStateError(NsdPrepError):
    """The DataLad dataset is not in a state the operation needs (dirty, locked, missing subdataset)."""
