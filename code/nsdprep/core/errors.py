"""Error hierarchy: every message names the file, what was expected, what was found, what to do.

Each class also subclasses the builtin a Python user would catch (as nilearn's errors do), so
``except FileNotFoundError`` or ``except ValueError`` keeps working around this package. The command
line turns every one of them into a single line and exit code 2, without a traceback.
"""


class NsdPrepError(Exception):
    """Base class of all errors this package raises on purpose."""


class UsageError(NsdPrepError, ValueError):
    """A wrong argument or option value (a user mistake in the command, not in the data)."""


class MissingInputError(NsdPrepError, FileNotFoundError):
    """An input file or its content is absent (e.g. not yet ``datalad get``)."""


class FormatError(NsdPrepError, ValueError):
    """An input exists but does not have the expected format, shape, dtype, grid or fields."""


class RemoteError(NsdPrepError, ConnectionError):
    """The data source answered with an error or could not be reached."""


class DatasetStateError(NsdPrepError, RuntimeError):
    """The DataLad dataset is not in a state the operation needs (dirty, locked, missing subdataset)."""


class HeaderError(FormatError):
    """A file's header claims what the file cannot be (impossible shape, offset or size).

    The bytes are as the source made them: fetching the file again gives the same header, so no
    message of this class suggests a re-download (unlike damaged content, e.g. a cut gzip stream).
    """
