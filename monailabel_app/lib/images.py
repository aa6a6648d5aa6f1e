"""Read studies as `[z, y, x]` arrays with their geometry, and write label maps in that geometry.

Index order follows docs/api.md: a NIfTI/NRRD/DICOM series is loaded as `[k, j, i]`, so axial
is axis 0, coronal axis 1, sagittal axis 2, and the 2D plane for `slice` s along `axis` a is
`np.take(volume, s, axis=a)`. The label file is a NIfTI with the image's own RAS affine (and the
source's sform/qform codes for NIfTI inputs), so any viewer overlays it on the image exactly.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from citrusv.imaging import bone_bright  # the engine's reader mirrors MONOCHROME1 alike
from citrusv.errors import InputError
from citrusv.io import enhanced_geometry  # also what the engine's reader reads
from citrusv.io import pixel_spacing  # the engine's reader's rule: no pixel size, no mm
from citrusv.io import PICTURE_SUFFIXES  # the engine's reader's picture files

from .errors import RequestError

# Limits that keep one request from taking the server down; settable with --conf.
MAX_SLICE_PIXELS = 8192 * 8192
MAX_VOXELS = 1024 * 1024 * 1024

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# a DICOM Modality code (CT, MR, CR, DX, ...) in an NRRD's `modality:=` key; the Slicer
# library's copy, which writes it, is `CitrusVLib.label_io.MODALITY`
NRRD_MODALITY = re.compile(r"^[A-Z]{2,4}$")
# `pixel_size:=unknown`: the upload's pixel size is not its DICOM image's (the Slicer
# library's copy, which writes it, is `CitrusVLib.label_io.PIXEL_SIZE_UNKNOWN`)
NRRD_NO_PIXEL_SIZE = "unknown"


@dataclass
class Study:
    """One image as the app sees it: scanner values in `[z, y, x]` plus its geometry."""

    array: np.ndarray  # [z, y, x] (or [1, H, W, 3] for an RGB picture), scanner units
    affine: np.ndarray  # 4x4, voxel (i, j, k) -> RAS mm
    is_2d: bool
    modality: str = ""  # "CT", "CR", "DX", "MR", ... when the file says so
    path: str = ""
    nifti_codes: tuple[int, int] = (1, 1)  # (qform_code, sform_code) for the label file
    meta: dict = field(default_factory=dict)
    # False where the file gives no pixel size (a picture; a DICOM image with no PixelSpacing
    # or ImagerPixelSpacing, or zeros there, as the sample CR has): the affine then has 1 mm,
    # which places a label but measures nothing
    spacing_known: bool = True

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape[:3])  # type: ignore[return-value]

    @property
    def spacing(self) -> list[float]:
        """Voxel size in mm along the array axes `[z, y, x]`."""
        ijk = np.linalg.norm(self.affine[:3, :3], axis=0)
        return [round(float(v), 6) for v in ijk[::-1]]

    def plane(self, slice_index: int, axis: int = 0) -> np.ndarray:
        """The 2D image at `slice_index` along `axis` (rows, columns = the remaining axes)."""
        return np.take(self.array, slice_index, axis=axis)

    def plane_spacing(self, axis: int = 0) -> tuple[float, float]:
        """(row, column) pixel size in mm of a plane along `axis`."""
        sp = [s for a, s in enumerate(self.spacing) if a != axis]
        return float(sp[0]), float(sp[1])


def _check_size(shape: tuple[int, ...], what: str) -> None:
    dims = [int(v) for v in shape]
    if any(v <= 0 for v in dims):
        raise RequestError(f"The {what} has an empty dimension {tuple(dims)}; upload a real image.")
    rows_cols = dims[-2] * dims[-1] if len(dims) >= 2 else dims[0]
    if rows_cols > MAX_SLICE_PIXELS or int(np.prod(dims)) > MAX_VOXELS:
        raise RequestError(
            f"The {what} is too large ({' x '.join(map(str, dims))}); the server accepts at most "
            f"{MAX_SLICE_PIXELS} pixels per slice and {MAX_VOXELS} voxels, so crop or downsample it.",
            status_code=413,
        )


def _suffix(path: str) -> str:
    name = os.path.basename(path).lower()
    for s in (".nii.gz", ".nrrd", ".nhdr", ".nii", *DICOM_SUFFIXES, *PICTURE_SUFFIXES):
        if name.endswith(s):
            return s
    return Path(name).suffix


# ---------------------------------------------------------------------------------------------
# readers


def _read_nifti(path: str) -> Study:
    try:
        img = nib.load(path)
        shape = tuple(img.shape)
    except Exception as e:  # nibabel raises many types for a broken header
        raise RequestError(f"The file could not be read as NIfTI ({e}); upload a valid .nii.gz.") from e
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise RequestError(
            f"The image has {len(img.shape)} dimensions {tuple(img.shape)}; send a 2D or 3D image."
        )
    _check_size(shape[::-1], "image")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except Exception as e:
        raise RequestError(f"The NIfTI pixel data could not be read ({e}); upload a valid file.") from e
    is_2d = len(shape) == 2
    array = data.T[None] if is_2d else data.transpose(2, 1, 0)
    hdr = img.header
    codes = (int(hdr["qform_code"]), int(hdr["sform_code"]))
    return Study(np.ascontiguousarray(array), img.affine.copy(), is_2d, path=path,
                 nifti_codes=codes if any(codes) else (1, 1))


def _read_nrrd(path: str) -> Study:
    import nrrd

    try:
        header = nrrd.read_header(path)
        sizes = tuple(int(v) for v in header["sizes"])
    except Exception as e:
        raise RequestError(f"The file could not be read as NRRD ({e}); upload a valid .nrrd.") from e
    if len(sizes) not in (2, 3):
        raise RequestError(f"The image has {len(sizes)} dimensions {sizes}; send a 2D or 3D image.")
    _check_size(sizes[::-1], "image")
    data, header = nrrd.read(path)  # index order F: [i, j, k]
    is_2d = data.ndim == 2
    dirs = np.asarray(header.get("space directions", np.eye(data.ndim)), dtype=float)
    dirs = np.nan_to_num(dirs)
    origin = np.asarray(header.get("space origin", np.zeros(dirs.shape[1])), dtype=float)
    affine = np.eye(4)
    affine[: dirs.shape[1], : dirs.shape[0]] = dirs.T
    affine[: origin.shape[0], 3] = origin
    space = str(header.get("space", "left-posterior-superior")).lower()
    if space in ("left-posterior-superior", "lps"):
        affine = LPS_TO_RAS @ affine
    array = data.T[None] if is_2d else data.transpose(2, 1, 0)
    # the DICOM Modality the Slicer module writes into an upload's NRRD (`modality:=CR`), so a
    # radiograph sent from Slicer is not taken for a CT of unknown kind
    modality = str(header.get("modality", "")).strip().upper()
    # and whether its pixel size is its DICOM image's (`pixel_size:=unknown` when the files
    # give none, and Slicer shows the image at 1 mm, or Slicer shows it at another size)
    known = str(header.get("pixel_size", "")).strip().lower() != NRRD_NO_PIXEL_SIZE
    return Study(np.ascontiguousarray(array), affine, is_2d, path=path,
                 modality=modality if NRRD_MODALITY.match(modality) else "",
                 spacing_known=known, meta={} if known else {"pixel_size_unknown": True})


def _dicom_affine(ds, n_slices: int = 1, last_position=None) -> np.ndarray:
    """RAS affine of a DICOM image or series (LPS patient frame, converted); 1 mm pixels where
    the header gives no pixel size (`citrusv.io.pixel_spacing`)."""
    row_mm, col_mm = pixel_spacing(ds) or (1.0, 1.0)
    iop = [float(v) for v in ds.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    row_dir, col_dir = np.asarray(iop[:3]), np.asarray(iop[3:])
    normal = np.cross(row_dir, col_dir)
    origin = np.asarray([float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])])
    thickness = float(ds.get("SpacingBetweenSlices", ds.get("SliceThickness", 1.0)) or 1.0)
    slice_vec = normal * (thickness if thickness > 0 else 1.0)
    if last_position is not None and n_slices > 1:
        slice_vec = (np.asarray(last_position) - origin) / (n_slices - 1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_mm  # i runs along a row (columns)
    lps[:3, 1] = col_dir * row_mm  # j runs down the rows
    lps[:3, 2] = slice_vec
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def _pixel_array(ds) -> np.ndarray:
    """The stored pixels, decoded; a 400 that says so where they cannot be."""
    try:
        return ds.pixel_array
    except Exception as e:
        raise RequestError(
            f"The DICOM pixel data could not be decoded ({e}); send an uncompressed or "
            "standard-compressed DICOM image."
        ) from e


def _dicom_pixels(ds) -> np.ndarray:
    pixels = _pixel_array(ds).astype(np.float32)
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return pixels * slope + intercept


def _read_dicom_header(path: str):
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False, force=False)
        _ = ds.Rows, ds.Columns
    except Exception as e:
        raise RequestError(
            "The file is not a readable DICOM image (corrupt or missing pixel data); "
            "send the original .dcm file."
        ) from e
    return ds


def _read_enhanced(ds, path: str, geo: dict) -> Study:
    """An enhanced multi-frame DICOM image (one file holding a CT series, as newer scanners
    write) as a volume, its frames in position order, with the pixel size, orientation,
    positions and rescale of its functional groups (`citrusv.io.enhanced_geometry`; read at its
    top level it gave 1 mm pixels 1 mm apart and no rescale)."""
    from pydicom.dataset import Dataset

    pixels = _pixel_array(ds)
    if pixels.ndim != 3 or pixels.shape[0] != len(geo["order"]):
        raise RequestError("The multi-frame DICOM image's frames could not be read as one "
                           "grayscale volume; send it as a classic series.")
    array = bone_bright(pixels[geo["order"]].astype(np.float32) * geo["slope"] + geo["intercept"],
                        ds.get("PhotometricInterpretation"))
    flat = Dataset()  # what a classic slice says at its top level, for _dicom_affine
    flat.ImageOrientationPatient = geo["orientation"]
    flat.ImagePositionPatient = geo["first"]
    if geo["pixel_spacing"] is not None:
        flat.PixelSpacing = geo["pixel_spacing"]
    if geo["thickness"] is not None:
        flat.SliceThickness = geo["thickness"]
    study = Study(np.ascontiguousarray(array), _dicom_affine(flat, len(array), geo["last"]),
                  False, modality=str(ds.get("Modality", "")), path=path,
                  spacing_known=geo["pixel_spacing"] is not None)
    if said := uneven_slices_warning(np.diff(geo["along"])):
        study.meta["uneven_slices"] = said
    return study


def _read_dicom_file(path: str) -> Study:
    ds = _read_dicom_header(path)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    _check_size((frames, int(ds.Rows), int(ds.Columns)), "DICOM image")
    try:
        geo = enhanced_geometry(ds)
    except InputError as e:
        raise RequestError(str(e)) from e
    if geo is not None:
        return _read_enhanced(ds, path, geo)
    pixels = bone_bright(_dicom_pixels(ds), ds.get("PhotometricInterpretation"))
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4) and frames == 1:
        raise RequestError("Colour DICOM images are not supported; send a grayscale image.")
    array = pixels[None] if pixels.ndim == 2 else pixels
    return Study(np.ascontiguousarray(array), _dicom_affine(ds), array.shape[0] == 1,
                 modality=str(ds.get("Modality", "")), path=path,
                 spacing_known=pixel_spacing(ds) is not None)


def is_dicom_file(path) -> bool:
    """A DICOM file by its name (.dcm, .dicom, .ima) or by the DICM mark DICOM files carry;
    not DICOMDIR, an export's index, which holds no image."""
    name = os.path.basename(str(path))
    return (not name.startswith(".") and name.upper() != "DICOMDIR" and os.path.isfile(path)
            and (_suffix(str(path)) in DICOM_SUFFIXES or _looks_like_dicom(str(path))))


def series_files(path) -> list[Path]:
    """The DICOM files directly in a folder, sorted by name (other files are left out)."""
    return sorted(p for p in Path(path).iterdir() if is_dicom_file(p))


def holds_dicom(path) -> bool:
    """Whether a folder holds a DICOM file directly; stops at the first (the datastore asks
    this of every folder at each refresh, which a series being copied in sets off per file).
    False for a folder it may not read or that is gone, so one such folder does not stop the
    listing of the others."""
    try:
        with os.scandir(path) as entries:
            return any(is_dicom_file(entry.path) for entry in entries)
    except OSError:
        return False


def _read_dicom_series(path: str) -> Study:
    files = series_files(path)
    if not files:
        raise RequestError("The image folder holds no DICOM file; put a DICOM series (one file "
                           "per slice) in it.")
    slices = [_read_dicom_header(str(f)) for f in files]
    series = list(dict.fromkeys(str(s.get("SeriesInstanceUID", "")) for s in slices))
    if len(series) > 1:  # their slices would be stacked into one volume, interleaved
        raise RequestError(f"The folder '{os.path.basename(os.path.normpath(path))}' holds "
                           f"{len(series)} DICOM series; put each series in a folder of its own "
                           "in the studies folder (`citrusv sort-dicom FOLDER STUDIES` does so).")
    if len(slices) > 1 and any(s.get("ImagePositionPatient") is None for s in slices):
        # radiographs (a PA and a lateral view share a series): no volume to stack them into
        if os.path.basename(os.path.normpath(path)) == series[0]:
            # the PACS datastore's cache: a folder per series, named by its SeriesInstanceUID
            raise RequestError(f"The PACS series '{series[0]}' holds {len(slices)} DICOM images "
                               "without a slice position (radiographs have none; a PA and a "
                               "lateral view may share a series), which make no volume; upload "
                               "the one image to ask about (the Slicer module does so itself).")
        raise RequestError(f"The folder '{os.path.basename(os.path.normpath(path))}' holds "
                           f"{len(slices)} DICOM images without a slice position (radiographs "
                           "have none), which make no volume; put each image in the studies "
                           "folder as a file of its own (`citrusv sort-dicom FOLDER STUDIES` "
                           "does so).")
    first = slices[0]
    _check_size((len(slices), int(first.Rows), int(first.Columns)), "DICOM series")
    iop = [float(v) for v in first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]
    normal = np.cross(iop[:3], iop[3:])

    def position(ds) -> float:
        return float(np.dot(normal, [float(v) for v in ds.get("ImagePositionPatient", [0, 0, 0])]))

    slices.sort(key=position)
    shapes = {(int(s.Rows), int(s.Columns)) for s in slices}
    if len(shapes) != 1:
        raise RequestError("The DICOM series mixes slice sizes; send one series per request.")
    # one mirror for the whole series (bone bright), so its slices keep one scale
    array = bone_bright(np.stack([_dicom_pixels(s) for s in slices]),
                        first.get("PhotometricInterpretation"))
    affine = _dicom_affine(slices[0], len(slices), slices[-1].get("ImagePositionPatient"))
    study = Study(array, affine, len(slices) == 1, modality=str(first.get("Modality", "")),
                  path=path, spacing_known=pixel_spacing(first) is not None)
    if said := uneven_slices_warning(np.diff([position(s) for s in slices])):
        study.meta["uneven_slices"] = said
    return study


def uneven_slices_warning(gaps: np.ndarray) -> str | None:
    """Said with every answer on a DICOM series whose slices are not evenly spaced (`gaps`
    between positions along the normal, sorted; more than 10 % apart: a slice missing from an
    export, two slices at one position): it is stacked as if they were, at its mean spacing, so
    places and sizes along the slice axis are off. None for an even series."""
    if not len(gaps) or (gaps.min() > 0 and gaps.max() <= 1.1 * gaps.min()):
        return None
    low, high = float(gaps.min()), float(gaps.max())
    if low <= 0:
        what = "two or more of its slices lie at the same position"
    else:
        what = f"the gaps between its slices run from {low:g} to {high:g} mm (a slice may be missing)"
    return (f"this series' slices are not evenly spaced: {what}; it was read as evenly spaced, so "
            "positions, lengths and volumes along the slice axis are off: send the complete "
            "series.")


# picture modes with more than 8 bits a pixel (16-bit PNG or TIFF, 32-bit, float): their values
# are kept, as the engine's reader (`citrusv.io.read_png`) keeps them
_VALUE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _read_picture(path: str) -> Study:
    """A picture file as [1, H, W, 3] uint8, or, for a grayscale picture of more than 8 bits a
    pixel (a 16-bit PNG of a CT slice or radiograph), its values as [1, H, W], for the window
    sent or the engine's own scaling (converted to RGB they were clipped to 0-255: a 16-bit
    PNG of a CT slice in HU + 1024 came out nearly all white, and nano found no liver on it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            _check_size((im.height, im.width), "image")
            if im.mode in _VALUE_MODES:
                values = np.asarray(im)
                pixels = values.astype(np.float32 if values.dtype.kind == "f" else np.int32)[None]
            else:
                pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)[None]
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError("The file is not a readable picture; send PNG, JPEG, NIfTI, NRRD or DICOM.") from e
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    return Study(pixels, affine, True, path=path, spacing_known=False)


def _looks_like_dicom(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return head[128:132] == b"DICM"
    except OSError:
        return False


def read_study(path: str) -> Study:
    """Read any supported image; bad files raise `RequestError` with one sentence."""
    if not path or not os.path.exists(path):
        raise RequestError("The image was not found; pass an image id from /datastore or upload a file.",
                           status_code=404)
    if os.path.isdir(path):
        return _read_dicom_series(path)
    if os.path.getsize(path) == 0:
        raise RequestError("The uploaded file is empty; send the image file itself.")
    suffix = _suffix(path)
    if suffix in (".nii", ".nii.gz"):
        return _read_nifti(path)
    if suffix in (".nrrd", ".nhdr"):
        return _read_nrrd(path)
    if suffix in DICOM_SUFFIXES or _looks_like_dicom(path):
        return _read_dicom_file(path)
    if suffix in PICTURE_SUFFIXES:
        return _read_picture(path)
    raise RequestError(
        f"The file type '{suffix or os.path.basename(path)}' is not an image this server reads; "
        "send NIfTI (.nii.gz), NRRD, DICOM (.dcm), PNG or JPEG."
    )


class StudyCache:
    """The last few studies read, keyed by path + mtime: a second question reuses the array."""

    def __init__(self, size: int = 2) -> None:
        self._size = size
        self._items: OrderedDict[tuple, Study] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> Study:
        try:
            st = os.stat(path)
            key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
        except OSError:
            return read_study(path)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        study = read_study(path)
        with self._lock:
            self._items[key] = study
            while len(self._items) > self._size:
                self._items.popitem(last=False)
        return study


# ---------------------------------------------------------------------------------------------
# label maps


def empty_label(study: Study) -> np.ndarray:
    return np.zeros(study.shape, dtype=np.uint8)


def paint(label: np.ndarray, mask: np.ndarray, value: int, slice_index: int | None, axis: int) -> None:
    """Write `value` where `mask` is set: a 2D mask on one plane, or a 3D mask on its own planes."""
    if mask.ndim == 3:
        label[mask.astype(bool)] = value
        return
    index: list = [slice(None)] * 3
    index[axis] = 0 if slice_index is None else slice_index
    plane = label[tuple(index)]
    plane[mask.astype(bool)] = value


def write_label(study: Study, label: np.ndarray, directory: str | None = None) -> str:
    """Write `label` ([z, y, x]) as .nii.gz in the study's geometry; returns the file path."""
    if label.max(initial=0) > 255:
        label = label.astype(np.uint16)
    return _write_nifti(study, label, "citrusv_label_", directory)


def write_image(study: Study, directory: str | None = None) -> str:
    """The study's own voxels ([z, y, x] scanner values) as .nii.gz in its geometry, int16
    where they are whole numbers in its range (a CT in HU); returns the file path. What `GET
    /datastore/image` sends for a series read from a folder, which is no one file."""
    data = study.array
    if (np.issubdtype(data.dtype, np.floating) and np.all(np.mod(data, 1) == 0)
            and data.min(initial=0) >= -32768 and data.max(initial=0) <= 32767):
        data = data.astype(np.int16)
    return _write_nifti(study, data, "citrusv_image_", directory)


def _write_nifti(study: Study, data: np.ndarray, prefix: str, directory: str | None) -> str:
    data = data.T if data.ndim == 3 else data
    img = nib.Nifti1Image(np.ascontiguousarray(data), study.affine)
    img.set_qform(study.affine, code=study.nifti_codes[0] or 1)
    img.set_sform(study.affine, code=study.nifti_codes[1] or 1)
    img.header.set_xyzt_units("mm")
    fd, out = tempfile.mkstemp(suffix=".nii.gz", prefix=prefix, dir=directory)
    os.close(fd)
    nib.save(img, out)
    return out


def read_label(path: str) -> Study:
    """A label map as a Study (same reader, so its index order matches the image's)."""
    return read_study(path)
