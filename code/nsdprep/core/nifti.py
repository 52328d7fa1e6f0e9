"""Streaming NIfTI-1 I/O for large gzip-compressed 4D files, one volume at a time.

An NSD session of 1 mm betas is 10.8 GB once decompressed; nibabel would need all of it (or re-decompress
from the start for every slice). A 4D NIfTI stores each 3D volume as one contiguous block (Fortran order),
so a single pass over the gzip stream yields the volumes in order with memory bounded by one volume.

Reading uses isal's ``igzip`` (several times faster than :mod:`gzip`); any decompression failure
(truncation, bit flip, CRC mismatch) becomes a :class:`~nsdprep.core.errors.FormatError` naming the file and
the volume. Before anything is allocated, :func:`read_header` checks the header against caps and the
file's size (:func:`check_header_fits`): an impossible shape or offset is a
:class:`~nsdprep.core.errors.HeaderError` (a wrong header: fetching the file again cannot help), told
apart from damaged content (a cut or corrupted stream: fetch a verified copy again). Writing (:class:`NiftiStreamWriter`) produces deterministic bytes (gzip mtime 0, no file name,
fixed zlib level) and goes through :func:`nsdprep.core._io.atomic_path`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.volumeutils import apply_read_scaling

from nsdprep.core._io import atomic_path, exact_cast, format_bytes, require_content
from nsdprep.core.errors import FormatError, HeaderError, UsageError

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
#: Size of the NIfTI-1 header proper, and of header + the 4-byte extension flag.
NIFTI1_HEADER_SIZE = 348
NIFTI1_MIN_OFFSET = 352
#: Raw-file read buffer for the gzip decoder (moderate: large enough to amortize syscalls).
READ_BUFFER = 1 << 20
#: Default ISA-L (igzip) level of written files (0..3); fixed, with isal pinned in
#: requirements.txt, so reruns give identical bytes. ISA-L level 1 is ~8x faster than zlib level 1
#: on beta volumes and compresses slightly better; the files are ordinary gzip streams.
DEFAULT_COMPRESSLEVEL = 1
#: NIfTI xform code of MNI space (``mni`` in nibabel).
MNI_XFORM_CODE = 4
#: NSD's 1 mm MNI grid (the MNI152 1 mm box): its shape, and the world coordinates (mm, RAS) of
#: its first and last voxel centres. NSD's MATLAB tools store it with x running left to right,
#: affine ``[[1,0,0,-91],[0,1,0,-126],[0,0,1,-72]]``, ``sform_code`` 1 ("scanner"),
#: ``qform_code`` 0; FSL stores the same box x-flipped, ``[[-1,0,0,90],...]``, codes 4.
MNI152_1MM_SHAPE = (182, 218, 182)
MNI152_1MM_WORLD_MIN = (-91.0, -126.0, -72.0)
MNI152_1MM_WORLD_MAX = (90.0, 91.0, 109.0)

#: Largest size of each of the first three dimensions (NSD's 1 mm grid: 182 x 218 x 182).
MAX_SPATIAL_DIM = 2048
#: Largest 3D volume, in bytes (NSD's 1 mm int16 volume: 14 MB; as float64: 58 MB).
MAX_VOLUME_BYTES = 1 << 30
#: Most bytes deflate can produce per compressed byte (258-byte matches in under 2 bits each).
MAX_DEFLATE_RATIO = 1032
#: What a damaged gzip stream's message advises (damaged content, never a wrong header).
REPAIR_HINT = (
    "Get a fresh, verified copy with `make repair SUBJECTS=..` (a plain drop + get fails if this "
    "damaged copy's checksum was recorded at its first download)."
)

_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,  # includes gzip.BadGzipFile and isal's BadGzipFile
    zlib.error,
    isal_zlib.error,
)


def read_header(path: str | os.PathLike[str]) -> nib.Nifti1Header:
    """Read and return the NIfTI-1 header of a gzip-compressed ``.nii.gz`` file.

    Only the first few hundred bytes are decompressed. Raises :class:`MissingInputError` when the file
    or its content is absent (a broken annex symlink) and :class:`FormatError` when it is not a gzip
    NIfTI-1 single file.
    """
    path = Path(path)
    require_content(path, "NIfTI file", "check the path.")
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if magic != GZIP_MAGIC:
        raise FormatError(
            f"{path}: not gzip-compressed (first bytes {magic!r}, expected {GZIP_MAGIC!r}); "
            "expected a .nii.gz file. If it is an unfinished download, `datalad get` it again."
        )
    # Decompress just the header: a gzip reader would decode (and check) a whole read-ahead buffer.
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    block = b""
    try:
        with open(path, "rb") as raw:
            while len(block) < NIFTI1_HEADER_SIZE and not decoder.eof:
                chunk = decoder.unconsumed_tail or raw.read(1 << 14)
                if not chunk:
                    break
                block += decoder.decompress(chunk, NIFTI1_HEADER_SIZE - len(block))
    except zlib.error as exc:
        raise FormatError(f"{path}: corrupted gzip stream in the NIfTI header ({exc})") from exc
    hdr = _parse_header(path, block)
    check_header_fits(path, hdr)
    return hdr


def check_header_fits(path: str | os.PathLike[str], hdr: nib.Nifti1Header) -> None:
    """Check a gzip NIfTI's header against caps and its file's size, before anything is allocated.

    Caps: 1..7 dimensions, each at least 1, the first three at most :data:`MAX_SPATIAL_DIM`; one
    volume at most :data:`MAX_VOLUME_BYTES`; a finite, non-negative ``vox_offset``. Size: offset +
    data must fit in what the compressed file can inflate to (:data:`MAX_DEFLATE_RATIO` times its
    size). When it does not, the stream is inflated to its end (constant memory; at most that
    bound): intact, the header is wrong (:class:`HeaderError`); broken, the file is damaged
    (:class:`FormatError` with the repair advice).
    """
    path = Path(path)
    shape = tuple(int(d) for d in hdr["dim"][1 : int(hdr["dim"][0]) + 1])
    dtype = hdr.get_data_dtype()
    raw_offset = float(hdr["vox_offset"])
    claim = f"shape {shape} of {dtype}"

    def bad(why: str) -> HeaderError:
        return HeaderError(
            f"{path}: bad NIfTI header: it claims {claim}; {why}. The header itself is wrong, so "
            "fetching the file again will not change it."
        )

    if not 1 <= int(hdr["dim"][0]) <= 7 or any(d < 1 for d in shape):
        raise bad("every image has 1 to 7 dimensions of at least 1")
    if any(d > MAX_SPATIAL_DIM for d in shape[:3]):
        raise bad(f"each of the first three dimensions is at most {MAX_SPATIAL_DIM}")
    volume = int(np.prod(shape[:3], dtype=np.int64)) * dtype.itemsize
    if volume > MAX_VOLUME_BYTES:
        raise bad(
            f"one volume would take {format_bytes(volume)}, more than the "
            f"{format_bytes(MAX_VOLUME_BYTES)} allowed"
        )
    if not (np.isfinite(raw_offset) and raw_offset >= 0):
        raise bad(f"data offset {raw_offset:g} is not a byte position")
    offset = max(int(raw_offset), NIFTI1_MIN_OFFSET)
    claim += f" at offset {raw_offset:g}"
    need = offset + volume * volume_count(hdr)
    size = path.stat().st_size
    if need <= size * MAX_DEFLATE_RATIO:
        return
    try:
        actual = _inflated_size(path)
    except _DECODE_ERRORS as exc:
        raise FormatError(
            f"{path}: gzip stream truncated or corrupted: the header claims {claim} ({need} "
            f"bytes), more than its {size} bytes can hold, and the stream breaks off "
            f"({type(exc).__name__}: {exc}). {REPAIR_HINT}"
        ) from exc
    raise bad(f"{need} bytes, but the file ({size} bytes, intact gzip) inflates to only {actual}")


def _inflated_size(path: Path) -> int:
    """Inflate a whole gzip file, keeping nothing: its uncompressed size (checks CRC and length)."""
    buf = bytearray(READ_BUFFER)
    total = 0
    with open(path, "rb", buffering=READ_BUFFER) as raw, igzip.GzipFile(fileobj=raw) as f:
        while n := f.readinto(buf):
            total += n
    return total


def check_betas_header(
    path: str | os.PathLike[str],
    *,
    dtype: np.dtype[Any] | type | str | None = np.int16,
    ndim: int = 4,
    shape3d: tuple[int, int, int] | None = None,
    affine: np.ndarray | None = None,
    atol: float = 1e-4,
) -> nib.Nifti1Header:
    """Validate a betas file's header before any heavy work; return it.

    Checks: gzip magic, NIfTI-1, ``ndim`` dimensions (4 for betas), positive sizes, the on-disk dtype
    (``None`` skips that check), a finite, invertible affine with positive voxel sizes, and
    optionally the 3D grid (``shape3d``, ``affine`` within ``atol``). Raises :class:`FormatError`
    naming the file, what was expected and what was found.
    """
    path = Path(path)
    hdr = read_header(path)
    shape = hdr.get_data_shape()
    if len(shape) != ndim:
        raise FormatError(f"{path}: expected a {ndim}D image, found shape {shape}")
    if any(int(s) < 1 for s in shape):
        raise FormatError(f"{path}: empty dimension in shape {shape}")
    found = hdr.get_data_dtype()
    if dtype is not None and found.newbyteorder("=") != np.dtype(dtype).newbyteorder("="):
        raise FormatError(
            f"{path}: expected data type {np.dtype(dtype)}, found {found} "
            "(NSD betas are int16, percent signal change x 300)"
        )
    aff = header_affine(hdr)
    if not np.all(np.isfinite(aff)) or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
        raise FormatError(f"{path}: affine is not finite/invertible:\n{aff}")
    zooms = hdr.get_zooms()[:3]
    if any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise FormatError(f"{path}: voxel sizes must be positive, found {zooms}")
    if shape3d is not None and tuple(shape[:3]) != tuple(shape3d):
        raise FormatError(f"{path}: expected grid shape {tuple(shape3d)}, found {tuple(shape[:3])}")
    if affine is not None and not np.allclose(aff, affine, atol=atol, rtol=0):
        raise FormatError(f"{path}: expected affine\n{np.asarray(affine)}\nfound\n{aff}")
    return hdr


def on_mni152_grid(shape: tuple[int, ...], affine: np.ndarray, *, atol: float = 1e-3) -> bool:
    """True if the grid is NSD's 1 mm MNI grid or a box of it, in either x orientation.

    That is: 1 mm voxels along the world axes (x may run either way, y and z run forward), every
    voxel centre on an integer millimetre, and every voxel inside the MNI152 1 mm box
    (:data:`MNI152_1MM_WORLD_MIN` .. :data:`MNI152_1MM_WORLD_MAX`). Whatever xform code such a file
    carries (NSD's own files say 1), its world coordinates are MNI.
    """
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or len(shape) < 3:
        return False
    axes = aff[:3, :3]
    if not np.allclose(np.abs(axes), np.eye(3), atol=atol) or not (
        axes[1, 1] > 0 and axes[2, 2] > 0
    ):
        return False
    origin = aff[:3, 3]
    if not np.allclose(origin, np.round(origin), atol=atol):
        return False
    corners = np.array([[0, 0, 0], [s - 1 for s in shape[:3]]], dtype=np.float64)
    world = corners @ axes.T + origin
    lo, hi = world.min(axis=0), world.max(axis=0)
    return bool(
        np.all(lo >= np.asarray(MNI152_1MM_WORLD_MIN) - atol)
        and np.all(hi <= np.asarray(MNI152_1MM_WORLD_MAX) + atol)
    )


def header_affine(hdr: nib.Nifti1Header) -> np.ndarray:
    """The affine nibabel would use for this header (sform, else qform, else fallback)."""
    return np.asarray(hdr.get_best_affine(), dtype=np.float64)


def iter_volumes(
    path: str | os.PathLike[str],
    start: int = 0,
    stop: int | None = None,
    *,
    scaled: bool = True,
    header: nib.Nifti1Header | None = None,
    reuse_buffer: bool = False,
) -> Iterator[np.ndarray]:
    """Yield the 3D volumes ``start:stop`` of a gzip 4D NIfTI-1 file, one at a time.

    Each yielded array is a fresh Fortran-ordered array (native byte order) that the caller may keep;
    the generator itself holds one volume at a time. With ``reuse_buffer=True`` every volume is
    decoded into the same buffer (no per-volume allocation and page faults): a yielded array is
    then only valid until the next one is requested. Volumes before ``start`` are decompressed and
    discarded (gzip is sequential). When reading up to the last volume, the rest of the stream is
    drained so the gzip CRC and length are verified; with an earlier ``stop`` they are not.

    Scaling follows nibabel's ``img.dataobj``: with no valid ``scl_slope`` (0 or NaN, as in NSD) or
    slope 1 / intercept 0, the on-disk values and dtype are returned unchanged; otherwise
    ``raw * slope + inter`` via :func:`nibabel.volumeutils.apply_read_scaling` (float). Pass
    ``scaled=False`` to always get the raw on-disk values.

    Raises :class:`FormatError` naming the file and the volume index on truncated or corrupted input
    (the decoder reads ahead by up to 512 KiB of compressed data, so the index is the volume being
    read when the damage was met, possibly one or two before the damaged one). A flip that deflate
    cannot see is caught by the CRC check after the last volume: consumers must treat the volumes
    as unverified until the generator is exhausted.
    """
    path = Path(path)
    hdr = read_header(path) if header is None else header
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if len(shape) < 3:
        raise FormatError(f"{path}: expected a 3D or 4D image, found shape {shape}")
    shape3d = shape[:3]
    n_vol = int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1
    stop = n_vol if stop is None else stop
    if not 0 <= start <= stop <= n_vol:
        raise UsageError(f"volume range {start}:{stop} outside 0:{n_vol} of {path}")
    dtype = hdr.get_data_dtype()
    nbytes = int(np.prod(shape3d, dtype=np.int64)) * dtype.itemsize
    slope, inter = hdr.get_slope_inter()
    slope = 1.0 if slope is None else slope
    inter = 0.0 if inter is None else inter
    offset = max(int(hdr.get_data_offset()), NIFTI1_MIN_OFFSET)
    index = -1  # volume being read, for error messages (-1: header/extensions)
    try:
        with open(path, "rb", buffering=READ_BUFFER) as raw, igzip.GzipFile(fileobj=raw) as f:
            _skip(f, offset)
            buf = bytearray(nbytes) if reuse_buffer else bytearray()
            for index in range(stop):
                if not reuse_buffer:
                    buf = bytearray(nbytes)
                got = _readinto_full(f, buf)
                if got != nbytes:  # the stream ended intact (igzip checked its CRC and length)
                    raise HeaderError(
                        f"{path}: data ends inside volume {index} of {n_vol} ({got} of {nbytes} "
                        f"bytes) in an intact gzip stream: bad NIfTI header, it claims shape "
                        f"{shape}, more than the file holds. The header itself is wrong, so "
                        "fetching the file again will not change it."
                    )
                if index < start:
                    continue
                vol = np.frombuffer(buf, dtype=dtype).reshape(shape3d, order="F")
                if not dtype.isnative:
                    vol = vol.astype(dtype.newbyteorder("="), order="F")
                if scaled:
                    vol = apply_read_scaling(vol, slope, inter)
                yield vol
            if stop == n_vol:
                index = n_vol  # trailing part: CRC/length check
                extra = _drain(f)
                if extra:
                    log.warning("%s: %d bytes after the last volume ignored", path, extra)
    except _DECODE_ERRORS as exc:
        where = (
            "in the header/extensions"
            if index < 0
            else f"in volume {index} of {n_vol}"
            if index < n_vol
            else "at the end of the stream (CRC/length check)"
        )
        raise FormatError(
            f"{path}: gzip stream truncated or corrupted {where}: {type(exc).__name__}: {exc}. "
            + REPAIR_HINT
        ) from exc


def volume_count(hdr: nib.Nifti1Header) -> int:
    """Number of 3D volumes of an image (product of the dimensions after the third)."""
    shape = hdr.get_data_shape()
    return int(np.prod(shape[3:], dtype=np.int64)) if len(shape) > 3 else 1


class NiftiStreamWriter:
    """Write a gzip NIfTI-1 file volume by volume, atomically and deterministically.

    Parameters
    ----------
    path
        Target ``.nii.gz`` path; nothing appears there until the context exits successfully.
    shape3d
        Shape of one volume.
    affine
        4x4 voxel-to-world affine, stored as both qform and sform.
    dtype
        On-disk data type (written little-endian).
    n_volumes
        Exact number of volumes that will be written; ``None`` writes a 3D image (one volume).
    header
        Optional header whose other fields (descrip, intent, TR, ...) are kept; shape, dtype,
        affine, scaling and offset are always set from the other arguments.
    compresslevel
        ISA-L level 0..3 (fixed per call so a rerun gives identical bytes with the pinned isal).
    xform_code
        sform code, and qform code unless ``qform_code`` is given (4 = MNI by default).
    qform_code
        qform code when it differs (NSD's MATLAB tools write sform 1, qform 0).
    scl_fields
        Values stored in ``scl_slope``/``scl_inter``; both defaults mean "no scaling": NaN (as
        nibabel writes) or 0 (as NSD's MATLAB tools write).

    Use as a context manager; :meth:`write` appends one volume. On exit without error the count is
    checked and the file renamed into place; on any error the temporary is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        shape3d: tuple[int, int, int],
        affine: np.ndarray,
        dtype: np.dtype[Any] | type | str,
        n_volumes: int | None,
        *,
        header: nib.Nifti1Header | None = None,
        compresslevel: int = DEFAULT_COMPRESSLEVEL,
        xform_code: int = MNI_XFORM_CODE,
        qform_code: int | None = None,
        scl_fields: tuple[float, float] = (np.nan, np.nan),
    ) -> None:
        self.path = Path(path)
        self.shape3d = tuple(int(s) for s in shape3d)
        if len(self.shape3d) != 3 or any(s < 1 for s in self.shape3d):
            raise UsageError(f"shape3d must be 3 positive sizes, got {shape3d!r}")
        if n_volumes is not None and int(n_volumes) < 1:
            raise UsageError(f"n_volumes must be >= 1 or None, got {n_volumes!r}")
        self.n_volumes = None if n_volumes is None else int(n_volumes)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.affine = np.asarray(affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise UsageError(f"affine must be a finite 4x4 array, got\n{self.affine}")
        self.compresslevel = int(compresslevel)
        self.header = self._make_header(
            header, int(xform_code), int(xform_code if qform_code is None else qform_code)
        )
        self.header["scl_slope"], self.header["scl_inter"] = scl_fields
        self.written = 0
        self._stack: contextlib.ExitStack | None = None
        self._gz: igzip.GzipFile | None = None

    def _make_header(
        self, template: nib.Nifti1Header | None, code: int, qcode: int
    ) -> nib.Nifti1Header:
        hdr = nib.Nifti1Header(endianness="<")
        tr = 1.0
        if template is not None:
            for key in ("descrip", "intent_code", "intent_p1", "intent_p2", "intent_p3"):
                hdr[key] = template[key]
            hdr["intent_name"] = template["intent_name"]
            if len(template.get_zooms()) > 3 and float(template.get_zooms()[3]) > 0:
                tr = float(template.get_zooms()[3])
        shape = self.shape3d + (() if self.n_volumes is None else (self.n_volumes,))
        hdr.set_data_shape(shape)
        hdr.set_data_dtype(self.dtype)
        hdr.set_qform(self.affine, code=qcode)
        hdr.set_sform(self.affine, code=code)
        if self.n_volumes is not None:
            hdr.set_zooms(tuple(hdr.get_zooms()[:3]) + (tr,))
        hdr.set_xyzt_units("mm", "sec")
        hdr.set_slope_inter(np.nan, np.nan)
        hdr["magic"] = b"n+1"
        hdr["vox_offset"] = NIFTI1_MIN_OFFSET
        return hdr

    def __enter__(self) -> NiftiStreamWriter:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path, expected_size=self._expected_size))
            raw = stack.enter_context(open(tmp, "wb"))
            self._gz = stack.enter_context(
                igzip.GzipFile(
                    filename="", mode="wb", fileobj=raw, compresslevel=self.compresslevel, mtime=0
                )
            )
            block = self.header.binaryblock
            self._gz.write(block + b"\0" * (NIFTI1_MIN_OFFSET - len(block)))
        except BaseException:
            # unwind *with* the exception: a plain close() would let atomic_path rename the
            # partial temporary into place as if it were finished
            if not stack.__exit__(*sys.exc_info()):
                raise
            raise  # pragma: no cover (nothing in the stack suppresses exceptions)
        self._stack = stack
        return self

    def _expected_size(self, written_bytes: int) -> int:
        """Whole-file size for a disk-full message (an estimate).

        Extrapolated from the volumes written so far once enough has reached the disk (buffers
        hold the rest), else the uncompressed size.
        """
        total = 1 if self.n_volumes is None else self.n_volumes
        if self.written and written_bytes >= 1 << 20:
            return int(written_bytes * total / self.written)
        return NIFTI1_MIN_OFFSET + total * int(np.prod(self.shape3d)) * self.dtype.itemsize

    def write(self, vol: np.ndarray) -> None:
        """Append one 3D volume (cast to the file dtype only when that is lossless)."""
        if self._gz is None:
            raise RuntimeError("NiftiStreamWriter.write() outside its `with` block")
        limit = 1 if self.n_volumes is None else self.n_volumes
        if self.written >= limit:
            raise FormatError(f"{self.path}: more than the declared {limit} volumes written")
        vol = np.asarray(vol)
        if vol.shape != self.shape3d:
            raise UsageError(f"{self.path}: volume shape {vol.shape}, expected {self.shape3d}")
        vol = exact_cast(vol, self.dtype, self.path)
        # Fortran order on disk; the transpose of a Fortran array is a C-contiguous view of it.
        self._gz.write(np.asfortranarray(vol).T.reshape(-1))
        self.written += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        stack, self._stack = self._stack, None
        if stack is None:
            return False
        if exc_type is None:
            expected = 1 if self.n_volumes is None else self.n_volumes
            if self.written != expected:
                err = FormatError(
                    f"{self.path}: {self.written} volumes written, {expected} declared; "
                    "output not created"
                )
                try:
                    stack.__exit__(FormatError, err, None)
                finally:
                    self._gz = None
                raise err
        try:
            return bool(stack.__exit__(exc_type, exc, tb))
        finally:
            self._gz = None


def _parse_header(path: Path, block: bytes) -> nib.Nifti1Header:
    if len(block) < NIFTI1_HEADER_SIZE:
        raise FormatError(
            f"{path}: only {len(block)} bytes after decompression, a NIfTI-1 header has "
            f"{NIFTI1_HEADER_SIZE}"
        )
    try:
        hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(block), check=True)
    except Exception as exc:  # nibabel raises HeaderDataError/others on invalid headers
        raise FormatError(f"{path}: not a valid NIfTI-1 header ({exc})") from exc
    if hdr["magic"].item() != b"n+1":
        raise FormatError(
            f"{path}: NIfTI magic {hdr['magic'].item()!r}, expected b'n+1' (single-file NIfTI-1)"
        )
    return hdr


def _readinto_full(f: Any, buf: bytearray) -> int:
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        # moderate chunks: the decoder's temporaries stay small and cache-resident
        n = f.readinto(view[got : got + READ_BUFFER])
        if not n:
            break
        got += n
    return got


def _skip(f: Any, n: int) -> None:
    remaining = n
    while remaining > 0:
        chunk = f.read(min(remaining, READ_BUFFER))
        if not chunk:
            raise EOFError(f"stream ended {remaining} bytes before the data offset {n}")
        remaining -= len(chunk)


def _drain(f: Any) -> int:
    total = 0
    while chunk := f.read(READ_BUFFER):
        total += len(chunk)
    return total
