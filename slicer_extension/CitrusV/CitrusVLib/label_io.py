"""Read and write label volumes with their geometry, as ``[k, j, i]`` arrays + IJK-to-RAS.

NRRD is read and written here with numpy alone (Slicer's Python has no pynrrd); NIfTI uses
nibabel when it is installed (the server and the headless twin have it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
from dataclasses import dataclass

import numpy as np

from .geometry import LPS_TO_RAS

_NRRD_TYPES = {
    "uchar": np.uint8,
    "unsigned char": np.uint8,
    "uint8": np.uint8,
    "uint8_t": np.uint8,
    "signed char": np.int8,
    "char": np.int8,
    "int8": np.int8,
    "int8_t": np.int8,
    "short": np.int16,
    "int16": np.int16,
    "int16_t": np.int16,
    "signed short": np.int16,
    "ushort": np.uint16,
    "unsigned short": np.uint16,
    "uint16": np.uint16,
    "uint16_t": np.uint16,
    "int": np.int32,
    "int32": np.int32,
    "int32_t": np.int32,
    "signed int": np.int32,
    "uint": np.uint32,
    "unsigned int": np.uint32,
    "uint32": np.uint32,
    "uint32_t": np.uint32,
    "longlong": np.int64,
    "int64": np.int64,
    "int64_t": np.int64,
    "ulonglong": np.uint64,
    "uint64": np.uint64,
    "uint64_t": np.uint64,
    "float": np.float32,
    "double": np.float64,
}
_NRRD_NAMES = {
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int8): "int8",
    np.dtype(np.int16): "int16",
    np.dtype(np.uint16): "uint16",
    np.dtype(np.int32): "int32",
    np.dtype(np.uint32): "uint32",
    np.dtype(np.int64): "int64",
    np.dtype(np.uint64): "uint64",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",
}


MODALITY = re.compile(r"^[A-Z]{2,4}$")  # a DICOM Modality code: CT, MR, CR, DX, MG, ...
PIXEL_SIZE_UNKNOWN = "unknown"  # the NRRD key `pixel_size:=unknown` of an upload


@dataclass
class LabelVolume:
    """A volume array indexed ``[k, j, i]`` and the 4×4 matrix mapping IJK to RAS; for an
    upload, the DICOM Modality Slicer recorded for it ("CR", "CT"; "" when unknown), which the
    NRRD carries as ``modality:=CR`` so the server knows a radiograph from a CT; and whether
    its pixel size is known: False where it is not the DICOM image's (the files give none and
    Slicer places the image at 1 mm, or Slicer places it at another size; see
    ``CitrusVMRML.dicom_pixel_size_known``), which the NRRD carries as ``pixel_size:=unknown``,
    so the server measures nothing in mm, as it does for such a DICOM file itself."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str = ""
    pixel_size_known: bool = True


def upload_id(name: str, volume: LabelVolume) -> str:
    """The datastore id an uploaded volume gets: ``slicer_<name>_<12 hex digits>`` of its
    voxels and geometry. The same volume gets the same id in every Slicer session (the server
    keeps one copy); two volumes never share one, so a correction never lands on another
    volume's image (the server refuses another image under a taken id)."""
    digest = hashlib.blake2b(digest_size=6)
    array = np.ascontiguousarray(volume.array)
    digest.update(repr((array.shape, array.dtype.str)).encode())
    digest.update(np.round(np.asarray(volume.ijk_to_ras, dtype=float), 6).tobytes())
    digest.update(array.tobytes())
    if volume.modality:  # the same voxels said to be another kind of image are another image
        digest.update(volume.modality.encode())
    if not volume.pixel_size_known:  # its 1 mm is not a size: another image than one at 1 mm
        digest.update(b"pixel_size:=unknown")
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)[:40] or "volume"
    return f"slicer_{safe}_{digest.hexdigest()}"


def _suffix(name: str) -> str:
    lower = name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".nhdr"):
        if lower.endswith(ext):
            return ext
    return os.path.splitext(lower)[1]


def read_label_volume(
    source: str | os.PathLike | bytes, filename: str | None = None
) -> LabelVolume:
    """Read a ``.nrrd`` or ``.nii(.gz)`` label file from a path or from bytes plus its name."""
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), filename or ""
    else:
        name = filename or os.fspath(source)
        with open(source, "rb") as f:
            data = f.read()
    ext = _suffix(name)
    if ext == ".dcm" or data[128:132] == b"DICM":
        return _read_dicom(data)
    if ext == ".nrrd" or data[:4] == b"NRRD":
        return _read_nrrd(data)
    if ext in (".nii", ".nii.gz") or data[:2] == b"\x1f\x8b":
        return _read_nifti(data)
    raise ValueError(f"Cannot read '{name}': expected .nrrd, .nii.gz or a single DICOM file.")


def write_label_volume(path: str | os.PathLike, volume: LabelVolume) -> str:
    """Write ``volume`` to ``path`` (``.nrrd`` always works; ``.nii.gz`` needs nibabel)."""
    path = os.fspath(path)
    ext = _suffix(path)
    if ext == ".nrrd":
        _write_nrrd(path, volume)
    elif ext in (".nii", ".nii.gz"):
        import nibabel as nib

        data = np.ascontiguousarray(np.asarray(volume.array).transpose(2, 1, 0))
        img = nib.Nifti1Image(data, np.asarray(volume.ijk_to_ras, dtype=float))
        img.set_qform(img.affine, code=1)
        img.set_sform(img.affine, code=1)
        nib.save(img, path)
    else:
        raise ValueError(f"Cannot write label file '{path}': use .nrrd or .nii.gz.")
    return path


def _read_nifti(data: bytes) -> LabelVolume:
    try:
        import nibabel as nib
    except ImportError as exc:  # Slicer without nibabel: the adapter loads the file instead
        raise ValueError("Reading NIfTI label files needs nibabel (pip install nibabel).") from exc
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    img = nib.Nifti1Image.from_bytes(data)
    array = np.asanyarray(img.dataobj)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = array[:, :, None]
    return LabelVolume(
        np.ascontiguousarray(array.transpose(2, 1, 0)), np.asarray(img.affine, float)
    )


def _read_dicom(data: bytes) -> LabelVolume:
    """A single DICOM file (e.g. an X-ray) as a one-slice volume, in modality units."""
    try:
        import pydicom
    except ImportError as exc:
        raise ValueError("Reading DICOM files needs pydicom (pip install pydicom).") from exc
    ds = pydicom.dcmread(io.BytesIO(data))
    pixels = ds.pixel_array.astype(np.float32)
    if pixels.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) > 1:
        pixels = pixels.mean(axis=-1)
    if pixels.ndim == 2:
        pixels = pixels[None]
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels + pixels.min()
    known = pixel_size(ds)
    spacing = known or [1.0, 1.0]  # where the server places such an image
    origin = [float(v) for v in getattr(ds, "ImagePositionPatient", None) or [0, 0, 0]]
    cosines = [float(v) for v in getattr(ds, "ImageOrientationPatient", None) or [1, 0, 0, 0, 1, 0]]
    row, col = np.array(cosines[:3]), np.array(cosines[3:])
    m = np.eye(4)
    m[:3, 0] = row * float(spacing[1])
    m[:3, 1] = col * float(spacing[0])
    m[:3, 2] = np.cross(row, col) * float(getattr(ds, "SliceThickness", None) or 1.0)
    m[:3, 3] = origin
    return LabelVolume(pixels, LPS_TO_RAS @ m, pixel_size_known=known is not None)


def pixel_size(ds) -> list[float] | None:
    """(row, column) mm from PixelSpacing, else ImagerPixelSpacing; None where neither gives two
    positive numbers (the sample CR's PixelSpacing is 0\\0, which made a singular IJK-to-RAS):
    the server's rule (`citrusv.io.pixel_spacing`). `ds` is a pydicom dataset, or a mapping
    from those keywords to values as Slicer's DICOM database gives them ("0.14\\0.14")."""
    get = ds.get if isinstance(ds, dict) else (lambda tag: getattr(ds, tag, None))
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = get(tag)
        if isinstance(value, str):
            value = value.split("\\") if value.strip() else []
        try:
            value = [float(v) for v in value or []]
        except (TypeError, ValueError):
            continue
        if len(value) == 2 and all(v > 0 and np.isfinite(v) for v in value):
            return value
    return None


def _parse_vector(text: str) -> list[float] | None:
    text = text.strip()
    if text == "none":
        return None
    return [float(v) for v in text.strip("()").split(",")]


def _read_nrrd(data: bytes) -> LabelVolume:
    stream = io.BytesIO(data)
    magic = stream.readline()
    if not magic.startswith(b"NRRD"):
        raise ValueError("Not a NRRD file.")
    fields: dict[str, str] = {}
    while True:
        line = stream.readline()
        if not line or line in (b"\n", b"\r\n"):
            break
        text = line.decode("latin-1").rstrip("\r\n")
        if text.startswith("#") or ":" not in text:
            continue
        key, value = text.split(":", 1)
        fields[key.strip().lower()] = value.lstrip("=").strip()
    sizes = [int(v) for v in fields["sizes"].split()]
    dtype = np.dtype(_NRRD_TYPES[fields["type"].lower()])
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if fields.get("endian", "little") == "little" else ">")
    raw = stream.read()
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        raw = gzip.decompress(raw)
    elif encoding != "raw":
        raise ValueError(f"NRRD encoding '{encoding}' is not supported; use raw or gzip.")
    count = int(np.prod(sizes))
    array = np.frombuffer(raw[: count * dtype.itemsize], dtype=dtype).reshape(sizes[::-1])
    directions = (
        [_parse_vector(v) for v in re.findall(r"\([^)]*\)|none", fields["space directions"])]
        if "space directions" in fields
        else None
    )
    m = np.eye(4)
    if directions:
        cols = [d for d in directions if d is not None]
        m[:3, :3] = np.array(cols, dtype=float).T
    elif "spacings" in fields:
        m[:3, :3] = np.diag([float(v) for v in fields["spacings"].split()][:3])
    if "space origin" in fields:
        m[:3, 3] = _parse_vector(fields["space origin"])
    space = fields.get("space", "left-posterior-superior").lower()
    if space in ("left-posterior-superior", "lps"):
        m = LPS_TO_RAS @ m
    return LabelVolume(np.ascontiguousarray(array.astype(dtype.newbyteorder("="))), m)


def _write_nrrd(path: str, volume: LabelVolume) -> None:
    array = np.ascontiguousarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"Label volume must be 3D [k, j, i], got shape {array.shape}.")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    m = np.asarray(volume.ijk_to_ras, dtype=float)
    lps = LPS_TO_RAS @ m
    k, j, i = array.shape

    def vec(v: np.ndarray) -> str:
        return "(" + ",".join(repr(float(x)) for x in v) + ")"

    header = (
        "NRRD0004\n"
        f"type: {_NRRD_NAMES[array.dtype]}\n"
        "dimension: 3\n"
        "space: left-posterior-superior\n"
        f"sizes: {i} {j} {k}\n"
        f"space directions: {vec(lps[:3, 0])} {vec(lps[:3, 1])} {vec(lps[:3, 2])}\n"
        "kinds: domain domain domain\n"
        "endian: little\n"
        "encoding: gzip\n"
        f"space origin: {vec(lps[:3, 3])}\n"
        + (f"modality:={volume.modality}\n" if MODALITY.match(volume.modality) else "")
        + ("" if volume.pixel_size_known else f"pixel_size:={PIXEL_SIZE_UNKNOWN}\n")
        + "\n"
    )
    payload = gzip.compress(array.astype(array.dtype.newbyteorder("<")).tobytes(), compresslevel=1)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(header.encode("latin-1"))
        f.write(payload)
    os.replace(tmp, path)
