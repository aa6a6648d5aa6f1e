"""Slice ↔ IJK ↔ RAS maths for any orientation (CitrusVLib.geometry)."""

from __future__ import annotations

import numpy as np
import pytest
from CitrusVLib import geometry
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import oblique_lps_ijk_to_ras


def rotation(angles: tuple[float, float, float]) -> np.ndarray:
    a, b, c = angles
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


angles = st.tuples(*[st.floats(-np.pi, np.pi, allow_nan=False)] * 3)
spacings = st.tuples(*[st.floats(0.2, 5.0)] * 3)
origins = st.tuples(*[st.floats(-500, 500)] * 3)
flips = st.tuples(*[st.sampled_from([-1.0, 1.0])] * 3)


@st.composite
def matrices(draw) -> np.ndarray:
    """Random oblique IJK-to-RAS, stored as RAS or as LPS (DICOM), possibly with flipped axes."""
    direction = rotation(draw(angles)) @ np.diag(draw(flips))
    return geometry.ijk_to_ras_matrix(
        draw(origins), draw(spacings), direction, lps=draw(st.booleans())
    )


@settings(max_examples=200, deadline=None)
@given(m=matrices(), ijk=st.tuples(*[st.floats(-50, 600)] * 3))
def test_ijk_ras_round_trip(m, ijk):
    ras = geometry.ijk_to_ras(m, ijk)
    assert np.allclose(geometry.ras_to_ijk(m, ras), ijk, atol=1e-6)


def test_lps_matrix_flips_first_two_axes():
    m = geometry.ijk_to_ras_matrix([10, 20, 30], [1, 2, 3], lps=True)
    assert np.allclose(m, [[-1, 0, 0, -10], [0, -2, 0, -20], [0, 0, 3, 30], [0, 0, 0, 1]])
    assert np.allclose(geometry.lps_to_ras(geometry.ijk_to_ras_matrix([10, 20, 30], [1, 2, 3])), m)
    assert np.allclose(geometry.spacing_of(m), [1, 2, 3])


def slice_to_ras_for(m: np.ndarray, ijk_axis: int, index: float, tilt: np.ndarray) -> np.ndarray:
    """A view plane through continuous index ``index`` of ``ijk_axis``, in-plane rotated."""
    columns = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    normal = np.linalg.inv(columns).T[:, ijk_axis]
    normal /= np.linalg.norm(normal)
    helper = np.array([1.0, 0, 0]) if abs(normal[0]) < 0.9 else np.array([0, 1.0, 0])
    x = np.cross(helper, normal)
    x /= np.linalg.norm(x)
    y = np.cross(normal, x)
    x, y = tilt @ np.stack([x, y])  # arbitrary in-plane rotation
    point = np.zeros(3)
    point[ijk_axis] = index
    point[(ijk_axis + 1) % 3] = 3.7  # a plane point away from the volume centre
    s = np.eye(4)
    s[:3, 0], s[:3, 1], s[:3, 2] = x, y, normal
    s[:3, 3] = geometry.ijk_to_ras(m, point)
    return s


@settings(max_examples=150, deadline=None)
@given(
    m=matrices(),
    ijk_axis=st.integers(0, 2),
    frac=st.floats(0, 1),
    spin=st.floats(-np.pi, np.pi),
    flip_normal=st.booleans(),
)
def test_slice_index_of_a_view_any_orientation(m, ijk_axis, frac, spin, flip_normal):
    shape_kji = (37, 64, 52)
    n = shape_kji[2 - ijk_axis]
    index = int(round(frac * (n - 1)))
    tilt = np.array([[np.cos(spin), -np.sin(spin)], [np.sin(spin), np.cos(spin)]])
    s = slice_to_ras_for(m, ijk_axis, index + 0.3, tilt)
    if flip_normal:
        s[:3, 2] *= -1
    view = geometry.slice_for_view(m, s, shape_kji)
    assert view.axis == geometry.axis_name(ijk_axis)
    assert view.slice_index == index
    assert view.aligned
    assert view.continuous == pytest.approx(index + 0.3, abs=1e-6)


def test_axis_names_follow_the_array_axes():
    assert [geometry.axis_name(a) for a in (2, 1, 0)] == ["axial", "coronal", "sagittal"]
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert geometry.slice_shape(vol.shape, "axial") == vol[2].shape
    assert geometry.slice_shape(vol.shape, "coronal") == vol[:, 2, :].shape
    assert geometry.slice_shape(vol.shape, "sagittal") == vol[:, :, 2].shape
    # pixel (x=col, y=row) of each slice maps to the voxel numpy gives there
    for axis in geometry.AXES:
        plane = geometry.get_slice(vol, axis, 2)
        x, y = 3, 1
        i, j, k = geometry.pixel_to_ijk(axis, 2, x, y).astype(int)
        assert vol[k, j, i] == plane[y, x]
        assert geometry.ijk_to_pixel(axis, [i, j, k]) == (x, y, 2)


def test_view_in_the_other_tilt_is_flagged_not_aligned():
    m = oblique_lps_ijk_to_ras()
    s = np.eye(4)
    s[:3, 3] = geometry.ijk_to_ras(m, [10, 10, 4])  # a plain axial view on an oblique volume
    view = geometry.slice_for_view(m, s, (8, 30, 30))
    assert view.axis == "axial"
    assert not view.aligned


@settings(max_examples=100, deadline=None)
@given(m=matrices(), axis=st.sampled_from(geometry.AXES), data=st.data())
def test_box_roi_encloses_exactly_the_box(m, axis, data):
    x1 = data.draw(st.floats(0, 40))
    y1 = data.draw(st.floats(0, 40))
    x2 = x1 + data.draw(st.floats(1, 30))
    y2 = y1 + data.draw(st.floats(1, 30))
    s = data.draw(st.integers(0, 20))
    roi = geometry.box_to_roi(m, axis, s, [x1, y1, x2, y2])
    # the axes are a proper rotation
    assert np.allclose(roi.axes.T @ roi.axes, np.eye(3), atol=1e-9)
    assert np.linalg.det(roi.axes) == pytest.approx(1.0)
    # the 8 box corners (pixel edges, slice ± half a voxel) are exactly the ROI corners
    corners = []
    for px in (x1, x2):
        for py in (y1, y2):
            for ds in (-0.5, 0.5):
                corners.append(
                    geometry.ijk_to_ras(m, geometry.pixel_to_ijk(axis, s + ds, px - 0.5, py - 0.5))
                )
    corners = np.array(corners)
    roi_corners = roi.corners()
    for c in corners:
        assert np.min(np.linalg.norm(roi_corners - c, axis=1)) < 1e-6
    assert roi.contains(corners, tol=1e-6).all()
    # voxel centres strictly inside the box are inside, the next ones out are not
    inside = geometry.ijk_to_ras(
        m, geometry.pixel_to_ijk(axis, s, np.ceil(x1 - 0.5 + 1e-9), np.ceil(y1 - 0.5 + 1e-9))
    )
    outside = geometry.ijk_to_ras(m, geometry.pixel_to_ijk(axis, s, x2 + 0.5, y1 + 0.5))
    assert roi.contains(inside)
    assert not roi.contains(outside)
    box, centre_slice = geometry.roi_to_box(m, axis, roi)
    assert np.allclose(box, [x1, y1, x2, y2], atol=1e-6)
    assert centre_slice == pytest.approx(s)


def test_box_center_ras_is_the_box_middle_voxel_position():
    m = oblique_lps_ijk_to_ras()
    c = geometry.box_center_ras(m, "coronal", 7, [10, 20, 14, 30])
    assert np.allclose(geometry.ras_to_ijk(m, c), [11.5, 7, 24.5])


def test_mask_bbox_and_closer_look_square():
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:50, 60:80] = True
    assert geometry.mask_bbox(mask) == [60, 40, 80, 50]
    roi = geometry.closer_look_roi(mask, (100, 120), margin=0.25, min_size=8)
    x1, y1, x2, y2 = roi
    assert x2 - x1 == y2 - y1 == 30  # longer edge 20 + 2 × 25 %
    assert (x1 + x2) / 2 == 70 and (y1 + y2) / 2 == 45
    assert geometry.mask_bbox(np.zeros((3, 3), bool)) is None


def test_closer_look_square_is_around_the_masks_main_parts():
    """Stray pixels (a part under a quarter of the largest) do not stretch the crop; a second
    part at least that large does. Parts are 8-connected: a diagonal step joins."""
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:50, 60:80] = True  # 200 px
    mask[90:92, 5:7] = True  # 4 px, far away
    assert geometry.mask_bbox(mask) == [5, 40, 80, 92]
    assert geometry.main_parts_bbox(mask) == [60, 40, 80, 50]
    assert geometry.closer_look_roi(mask, (100, 120), margin=0.25, min_size=8) == [55, 30, 85, 60]
    mask[10:20, 100:105] = True  # 50 px: a quarter of the largest, kept
    assert geometry.main_parts_bbox(mask) == [60, 10, 105, 50]
    assert geometry.main_parts_bbox(mask, min_part=0.3) == [60, 40, 80, 50]
    diagonal = np.eye(6, dtype=bool)
    assert [len(p) for p in geometry.mask_parts(diagonal)] == [6]
    assert geometry.main_parts_bbox(np.zeros((4, 4), bool)) is None


def test_closer_look_squares_one_per_main_part():
    """The server crops a sent mask around each main part: the module asks the same way, one
    square per part at least a quarter of the largest (largest first), none for a speck."""
    mask = np.zeros((100, 120), dtype=bool)
    mask[40:50, 60:80] = True  # 200 px
    mask[90:92, 5:7] = True  # 4 px, far away
    assert geometry.closer_look_rois(mask, (100, 120), margin=0.25, min_size=8) == [
        [55, 30, 85, 60]]
    mask[10:20, 100:105] = True  # 50 px: a quarter of the largest, its own square
    assert geometry.closer_look_rois(mask, (100, 120), margin=0.25, min_size=8) == [
        [55, 30, 85, 60], [95, 8, 110, 23]]  # 10 px edge: side 15
    with pytest.raises(ValueError, match="empty"):
        geometry.closer_look_rois(np.zeros((5, 5), bool), (5, 5))


def test_closer_look_shifts_inside_and_clips_only_when_the_image_is_smaller():
    # near the corner: the square is shifted, keeping its size
    assert geometry.closer_look_roi([0, 0, 10, 10], (100, 100), margin=0.5, min_size=4) == [
        0,
        0,
        20,
        20,
    ]
    assert geometry.closer_look_roi([95, 90, 100, 100], (100, 100), margin=0.5, min_size=4) == [
        80,
        80,
        100,
        100,
    ]
    # minimum size
    assert geometry.closer_look_roi([50, 50, 52, 52], (100, 100), margin=0.1, min_size=32) == [
        35,
        35,
        67,
        67,
    ]
    # larger than a (thin) image along one side: clipped to that side only
    assert geometry.closer_look_roi([0, 0, 60, 10], (20, 200), margin=0.25, min_size=8) == [
        0,
        0,
        90,
        20,
    ]
    with pytest.raises(ValueError, match="empty"):
        geometry.closer_look_roi(np.zeros((5, 5), bool), (5, 5))


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), data=st.data())
def test_closer_look_always_inside_and_covers_the_box(h, w, data):
    x1 = data.draw(st.floats(0, w - 0.5))
    y1 = data.draw(st.floats(0, h - 0.5))
    x2 = data.draw(st.floats(x1 + 0.5, w))
    y2 = data.draw(st.floats(y1 + 0.5, h))
    rx1, ry1, rx2, ry2 = geometry.closer_look_roi([x1, y1, x2, y2], (h, w))
    assert 0 <= rx1 < rx2 <= w and 0 <= ry1 < ry2 <= h
    assert rx1 <= x1 + 1 and ry1 <= y1 + 1 and rx2 >= x2 - 1 and ry2 >= y2 - 1
    side = max(rx2 - rx1, ry2 - ry1)
    assert (rx2 - rx1 == side or rx2 - rx1 == w) and (ry2 - ry1 == side or ry2 - ry1 == h)


def test_bad_matrix_and_axis_are_refused_with_a_sentence():
    with pytest.raises(ValueError, match="4x4"):
        geometry.ijk_to_ras(np.eye(3), [0, 0, 0])
    with pytest.raises(ValueError, match="singular"):
        geometry.ijk_to_ras(np.diag([1, 0, 1, 1]), [0, 0, 0])
    with pytest.raises(ValueError, match="axis must be one of"):
        geometry.slice_shape((1, 2, 3), "oblique")


def test_same_voxel_grid_tells_two_readers_of_a_series_from_another_grid():
    m = oblique_lps_ijk_to_ras()
    shape = (40, 64, 80)  # k, j, i
    noise = m + np.r_[np.full((3, 4), 1e-4), np.zeros((1, 4))]  # float32 storage, rounding
    assert geometry.same_voxel_grid(shape, m, shape, m)
    assert geometry.same_voxel_grid(shape, m, shape, noise)
    flip = np.eye(4)
    flip[2, 2], flip[2, 3] = -1, shape[0] - 1  # the same voxels, slices in the other order
    assert not geometry.same_voxel_grid(shape, m, shape, m @ flip)
    shifted = m.copy()
    shifted[:3, 3] += 0.5 * m[:3, 0]  # half a voxel along I
    assert not geometry.same_voxel_grid(shape, m, shape, shifted)
    assert not geometry.same_voxel_grid(shape, m, (41, 64, 80), m)
