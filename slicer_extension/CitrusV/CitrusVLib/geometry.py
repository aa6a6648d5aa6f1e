"""Slice ↔ IJK ↔ RAS maths from a 4×4 IJK-to-RAS matrix, box → ROI and closer-look crops.

Conventions (docs/api.md):
- A volume array is indexed ``[k, j, i]``. The API axis names are index-space axes:
  ``axial`` = array axis 0 (K), ``coronal`` = array axis 1 (J), ``sagittal`` = array axis 2 (I),
  whatever the anatomical orientation of the scan.
- A slice is the numpy slice along that axis: axial ``vol[s]`` → rows J, columns I;
  coronal ``vol[:, s, :]`` → rows K, columns I; sagittal ``vol[:, :, s]`` → rows K, columns J.
- Pixel coordinates are ``x`` = column, ``y`` = row. Boxes ``[x1, y1, x2, y2]`` use pixel
  *edges*: the centre of pixel ``(c, r)`` sits at ``(c + 0.5, r + 0.5)``, so box coordinate
  ``x`` is continuous index ``x - 0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AXES = ("axial", "coronal", "sagittal")
# API axis name -> IJK index (0 = I, 1 = J, 2 = K) of the axis a slice steps through.
SLICE_IJK_AXIS = {"axial": 2, "coronal": 1, "sagittal": 0}
# API axis name -> IJK indices of (pixel x, pixel y, slice).
PIXEL_IJK_AXES = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _matrix(ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    m = np.asarray(ijk_to_ras, dtype=float)
    if m.shape != (4, 4):
        raise ValueError(f"IJK-to-RAS must be a 4x4 matrix, got shape {m.shape}.")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError("IJK-to-RAS matrix is singular (zero spacing or collinear axes).")
    return m


def check_axis(axis: str) -> str:
    if axis not in SLICE_IJK_AXIS:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got '{axis}'.")
    return axis


def ijk_to_ras_matrix(
    origin: Sequence[float],
    spacing: Sequence[float],
    direction: Sequence[Sequence[float]] | np.ndarray | None = None,
    lps: bool = False,
) -> np.ndarray:
    """Build IJK-to-RAS from origin, spacing and a 3×3 direction (columns = I, J, K axes).

    ``lps=True`` for DICOM/ITK geometry (origin and directions in LPS), as SimpleITK reports it.
    """
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(np.asarray(spacing, dtype=float))
    m[:3, 3] = np.asarray(origin, dtype=float)
    return LPS_TO_RAS @ m if lps else m


def lps_to_ras(ijk_to_lps: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Convert an IJK-to-LPS matrix (DICOM, ITK, NRRD 'left-posterior-superior') to IJK-to-RAS."""
    return LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=float)


def spacing_of(ijk_to_ras: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """Voxel spacing (mm) along I, J, K: the lengths of the matrix columns."""
    return np.linalg.norm(_matrix(ijk_to_ras)[:3, :3], axis=0)


def ijk_to_ras(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray, ijk: np.ndarray | Sequence
) -> np.ndarray:
    """Map continuous IJK point(s) ``(..., 3)`` to RAS."""
    m = _matrix(ijk_to_ras_m)
    p = np.asarray(ijk, dtype=float)
    return p @ m[:3, :3].T + m[:3, 3]


def ras_to_ijk(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray, ras: np.ndarray | Sequence
) -> np.ndarray:
    """Map RAS point(s) ``(..., 3)`` to continuous IJK."""
    m = _matrix(ijk_to_ras_m)
    p = np.asarray(ras, dtype=float)
    return np.linalg.solve(m[:3, :3], (p - m[:3, 3]).T).T


def same_voxel_grid(
    shape_kji: Sequence[int],
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    other_shape_kji: Sequence[int],
    other_ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    tolerance_voxels: float = 0.1,
) -> bool:
    """Whether two images index the same voxels: same shape, and each corner of the grid at
    the same RAS point to within ``tolerance_voxels`` of the smallest spacing. Two readers of
    one DICOM series agree this way; a flipped slice order or another series does not."""
    if tuple(int(v) for v in shape_kji) != tuple(int(v) for v in other_shape_kji):
        return False
    a, b = _matrix(ijk_to_ras_m), _matrix(other_ijk_to_ras_m)
    k, j, i = (max(int(v) - 1, 0) for v in shape_kji)
    corners = np.array([[x, y, z] for x in (0, i) for y in (0, j) for z in (0, k)], dtype=float)
    deviation = np.abs(ijk_to_ras(a, corners) - ijk_to_ras(b, corners)).max()
    return bool(deviation <= tolerance_voxels * spacing_of(a).min())


def pixel_to_ijk(axis: str, slice_index: float, x: float, y: float) -> np.ndarray:
    """Continuous IJK of slice pixel *index* ``(x, y)`` (pixel centres are integers here)."""
    ax_x, ax_y, ax_s = PIXEL_IJK_AXES[check_axis(axis)]
    ijk = np.zeros(3)
    ijk[ax_x], ijk[ax_y], ijk[ax_s] = x, y, slice_index
    return ijk


def ijk_to_pixel(axis: str, ijk: Sequence[float] | np.ndarray) -> tuple[float, float, float]:
    """``(x, y, slice)`` of an IJK point for slices along ``axis``."""
    ax_x, ax_y, ax_s = PIXEL_IJK_AXES[check_axis(axis)]
    p = np.asarray(ijk, dtype=float)
    return float(p[ax_x]), float(p[ax_y]), float(p[ax_s])


def slice_shape(volume_shape_kji: Sequence[int], axis: str) -> tuple[int, int]:
    """``(H, W)`` of a slice along ``axis`` of an array shaped ``[k, j, i]``."""
    k, j, i = (int(v) for v in volume_shape_kji)
    return {"axial": (j, i), "coronal": (k, i), "sagittal": (k, j)}[check_axis(axis)]


def slice_count(volume_shape_kji: Sequence[int], axis: str) -> int:
    return int(volume_shape_kji[AXES.index(check_axis(axis))])


def put_slice(volume: np.ndarray, axis: str, slice_index: int, plane: np.ndarray) -> None:
    """Write a 2D plane into ``volume[k, j, i]`` at ``slice_index`` along ``axis`` (in place)."""
    index = [slice(None)] * 3
    index[AXES.index(check_axis(axis))] = int(slice_index)
    target = volume[tuple(index)]
    if target.shape != plane.shape:
        raise ValueError(f"{axis} slice has shape {target.shape}, mask has {plane.shape}.")
    volume[tuple(index)] = plane


def get_slice(volume: np.ndarray, axis: str, slice_index: int) -> np.ndarray:
    index = [slice(None)] * 3
    index[AXES.index(check_axis(axis))] = int(slice_index)
    return volume[tuple(index)]


def view_ijk_axis(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray, view_normal_ras: Sequence[float]
) -> int:
    """The IJK axis (0 = I, 1 = J, 2 = K) a slice view with this normal steps through."""
    m = _matrix(ijk_to_ras_m)
    columns = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    normal = np.asarray(view_normal_ras, dtype=float)
    normal = normal / np.linalg.norm(normal)
    # The view steps along the IJK axis whose *plane* it shows: the one whose normal (in RAS,
    # rows of the inverse direction) is most parallel to the view normal. For orthogonal
    # volumes this equals the column test; for sheared ones it is the right choice.
    plane_normals = np.linalg.inv(columns).T
    plane_normals = plane_normals / np.linalg.norm(plane_normals, axis=0)
    return int(np.argmax(np.abs(normal @ plane_normals)))


def axis_name(ijk_axis: int) -> str:
    """API axis name for an IJK axis index."""
    return {2: "axial", 1: "coronal", 0: "sagittal"}[int(ijk_axis)]


@dataclass
class ViewSlice:
    """Where a slice view sits in a volume's index space."""

    axis: str  # API axis name (index space)
    slice_index: int  # nearest voxel index along that axis
    continuous: float  # exact continuous index of the plane
    aligned: bool  # view plane parallel to the volume's slices (within tolerance)


def slice_for_view(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    slice_to_ras: Sequence[Sequence[float]] | np.ndarray,
    volume_shape_kji: Sequence[int] | None = None,
    tolerance_deg: float = 1.0,
) -> ViewSlice:
    """The axis and slice index a Slicer view (its SliceToRAS matrix) shows of this volume.

    The plane point used is the one nearest the volume centre, so an oblique view gives the
    index where it crosses the middle of the volume.
    """
    m = _matrix(ijk_to_ras_m)
    s = np.asarray(slice_to_ras, dtype=float)
    normal = s[:3, 2] / np.linalg.norm(s[:3, 2])
    origin = s[:3, 3]
    ax = view_ijk_axis(m, normal)
    if volume_shape_kji is not None:
        k, j, i = volume_shape_kji
        centre = ijk_to_ras(m, [(i - 1) / 2, (j - 1) / 2, (k - 1) / 2])
    else:
        centre = m[:3, 3]
    point = centre - np.dot(centre - origin, normal) * normal
    continuous = float(ras_to_ijk(m, point)[ax])
    index = int(np.floor(continuous + 0.5))
    if volume_shape_kji is not None:
        n = int(volume_shape_kji[2 - ax])
        index = min(max(index, 0), n - 1)
    columns = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    plane_normals = np.linalg.inv(columns).T
    pn = plane_normals[:, ax] / np.linalg.norm(plane_normals[:, ax])
    angle = np.degrees(np.arccos(min(1.0, abs(float(np.dot(pn, normal))))))
    return ViewSlice(axis_name(ax), index, continuous, bool(angle <= tolerance_deg))


def slice_center_ras(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    volume_shape_kji: Sequence[int],
    axis: str,
    slice_index: int,
) -> np.ndarray:
    """RAS point at the centre of slice ``slice_index`` (to jump slice views to it)."""
    h, w = slice_shape(volume_shape_kji, axis)
    return ijk_to_ras(ijk_to_ras_m, pixel_to_ijk(axis, slice_index, (w - 1) / 2, (h - 1) / 2))


def box_center_ras(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    axis: str,
    slice_index: int,
    xyxy: Sequence[float],
) -> np.ndarray:
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return ijk_to_ras(
        ijk_to_ras_m, pixel_to_ijk(axis, slice_index, (x1 + x2) / 2 - 0.5, (y1 + y2) / 2 - 0.5)
    )


@dataclass
class RoiRAS:
    """An oriented box in RAS: centre, full edge lengths and unit axes (columns, right-handed)."""

    center: np.ndarray  # (3,)
    size: np.ndarray  # (3,) mm along axes[:, 0..2]
    axes: np.ndarray  # (3, 3) columns: RAS unit vectors of the ROI's own x, y, z

    def corners(self) -> np.ndarray:
        """The 8 corners in RAS, shape (8, 3)."""
        signs = np.array(
            [[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=float
        )
        return self.center + (signs * (self.size / 2)) @ self.axes.T

    def contains(self, ras: np.ndarray | Sequence, tol: float = 1e-6) -> np.ndarray:
        local = (np.asarray(ras, dtype=float) - self.center) @ self.axes
        return np.all(np.abs(local) <= self.size / 2 + tol, axis=-1)

    def object_to_world(self) -> np.ndarray:
        """4×4 with the axes as rotation and the centre as translation (ROI node orientation)."""
        m = np.eye(4)
        m[:3, :3] = self.axes
        m[:3, 3] = self.center
        return m


def box_to_roi(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    axis: str,
    slice_index: float,
    xyxy: Sequence[float],
    thickness_slices: float = 1.0,
) -> RoiRAS:
    """The RAS box covering pixel box ``xyxy`` on one slice (``thickness_slices`` voxels deep).

    The ROI axes follow the volume's IJK axes (so an oblique volume gives an oblique ROI) and
    its corners map exactly onto the pixel-box edges.
    """
    m = _matrix(ijk_to_ras_m)
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    lo = np.zeros(3)
    hi = np.zeros(3)
    ax_x, ax_y, ax_s = PIXEL_IJK_AXES[check_axis(axis)]
    lo[ax_x], hi[ax_x] = min(x1, x2) - 0.5, max(x1, x2) - 0.5
    lo[ax_y], hi[ax_y] = min(y1, y2) - 0.5, max(y1, y2) - 0.5
    lo[ax_s], hi[ax_s] = slice_index - thickness_slices / 2, slice_index + thickness_slices / 2
    return ijk_range_to_roi(m, lo, hi)


def ijk_range_to_roi(ijk_to_ras_m: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> RoiRAS:
    """RAS ROI for the continuous IJK range ``lo..hi`` (assumes orthogonal voxel axes)."""
    m = _matrix(ijk_to_ras_m)
    center = ijk_to_ras(m, (np.asarray(lo) + np.asarray(hi)) / 2)
    lengths = np.linalg.norm(m[:3, :3], axis=0)
    axes = m[:3, :3] / lengths
    size = np.abs(np.asarray(hi) - np.asarray(lo)) * lengths
    if np.linalg.det(axes) < 0:  # keep a proper rotation; flipping one axis keeps the box
        axes = axes.copy()
        axes[:, 2] = -axes[:, 2]
    return RoiRAS(center=center, size=size, axes=axes)


def roi_to_box(
    ijk_to_ras_m: Sequence[Sequence[float]] | np.ndarray,
    axis: str,
    roi: RoiRAS,
) -> tuple[list[float], float]:
    """Pixel box ``[x1, y1, x2, y2]`` and centre slice (continuous) of an ROI (e.g. user-edited)."""
    corners_ijk = ras_to_ijk(ijk_to_ras_m, roi.corners())
    ax_x, ax_y, ax_s = PIXEL_IJK_AXES[check_axis(axis)]
    xs, ys = corners_ijk[:, ax_x] + 0.5, corners_ijk[:, ax_y] + 0.5
    return [float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())], float(
        corners_ijk[:, ax_s].mean()
    )


def mask_bbox(mask: np.ndarray) -> list[int] | None:
    """Pixel-edge box ``[x1, y1, x2, y2]`` of a 2D mask, or None if it is empty."""
    rows = np.flatnonzero(np.any(mask, axis=1))
    cols = np.flatnonzero(np.any(mask, axis=0))
    if rows.size == 0:
        return None
    return [int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1]


def mask_parts(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected parts of a 2D mask, each as an ``(n, 2)`` array of (row, column)
    pixels, largest first (pure numpy: Slicer's Python need not have scipy)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    left = mask.copy()
    parts = []
    for start in zip(*np.nonzero(mask)):
        if not left[start]:
            continue
        left[start] = False
        stack, pixels = [start], []
        while stack:
            r, c = stack.pop()
            pixels.append((r, c))
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    rr, cc = r + dr, c + dc
                    if 0 <= rr < h and 0 <= cc < w and left[rr, cc]:
                        left[rr, cc] = False
                        stack.append((rr, cc))
        parts.append(np.asarray(pixels, dtype=int))
    return sorted(parts, key=len, reverse=True)


def main_parts_bbox(mask: np.ndarray, min_part: float = 0.25) -> list[int] | None:
    """Pixel-edge box of the mask's 8-connected parts that are at least ``min_part`` times
    the size of its largest part (the server's rule for the box of a structure's mask: a few
    stray pixels away from it would otherwise stretch the box); None if the mask is empty."""
    parts = main_parts(mask, min_part)
    return _pixels_box(np.concatenate(parts)) if parts else None


def main_parts(mask: np.ndarray, min_part: float = 0.25) -> list[np.ndarray]:
    """``mask_parts`` at least ``min_part`` times the size of the largest, largest first."""
    parts = mask_parts(np.asarray(mask, dtype=bool))
    return [p for p in parts if len(p) >= min_part * len(parts[0])]


def _pixels_box(pixels: np.ndarray) -> list[int]:
    """Pixel-edge box [x1, y1, x2, y2] of (row, column) pixels."""
    rows, cols = pixels[:, 0], pixels[:, 1]
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]


def closer_look_rois(
    mask: np.ndarray,
    image_size_hw: Sequence[int],
    margin: float = 0.25,
    min_size: int = 32,
    min_part: float = 0.25,
) -> list[list[int]]:
    """One ``closer_look_roi`` square per main part of a 2D mask (parts at least ``min_part``
    times the largest, largest first), as the server crops a mask it is sent: parts apart,
    such as the ascending and the descending aorta on one slice, each get their own square,
    where one square around both would show each small in a wide crop."""
    parts = main_parts(mask, min_part)
    if not parts:
        raise ValueError("The mask is empty: there is nothing to look at more closely.")
    return [closer_look_roi(_pixels_box(p), image_size_hw, margin, min_size) for p in parts]


def clip_box(xyxy: Sequence[float], image_size_hw: Sequence[int]) -> list[float]:
    h, w = image_size_hw
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    return [min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h)]


def closer_look_roi(
    region: Sequence[float] | np.ndarray,
    image_size_hw: Sequence[int],
    margin: float = 0.25,
    min_size: int = 32,
) -> list[int]:
    """Square crop ``[x1, y1, x2, y2]`` (integer pixel edges) around a box or a 2D mask (the
    box of its main parts, ``main_parts_bbox``: stray pixels would stretch the crop, and a
    model shown a far wider crop than the structure marks it worse).

    The side is the region's longer edge plus ``margin`` of it on each side (at least
    ``min_size``); the square is shifted, not squashed, to stay inside the image, and only
    clipped when the image itself is smaller than the square.
    """
    h, w = (int(v) for v in image_size_hw)
    region_arr = np.asarray(region)
    if region_arr.ndim == 2:
        box = main_parts_bbox(region_arr)
        if box is None:
            raise ValueError("The mask is empty: there is nothing to look at more closely.")
    else:
        box = clip_box(region_arr.tolist(), (h, w))
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"The box {list(region_arr.tolist())} is empty inside a {w}x{h} image.")
    side = max(x2 - x1, y2 - y1) * (1 + 2 * margin)
    side = int(np.ceil(max(side, min_size)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2

    def place(center: float, extent: int) -> tuple[int, int]:
        if side >= extent:
            return 0, extent
        start = int(round(center - side / 2))
        start = min(max(start, 0), extent - side)
        return start, start + side

    nx1, nx2 = place(cx, w)
    ny1, ny2 = place(cy, h)
    return [nx1, ny1, nx2, ny2]
