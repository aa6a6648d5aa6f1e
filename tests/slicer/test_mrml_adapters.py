"""CitrusVMRML against slicer-core: real vtkMRMLScene, volume, segmentation and ROI nodes."""

from __future__ import annotations

import numpy as np
import pytest
from CitrusVLib import Result, encode_rle, geometry
from CitrusVLib.label_io import LabelVolume, read_label_volume

from .conftest import oblique_lps_ijk_to_ras

SHAPE = (6, 40, 60)  # k, j, i


@pytest.fixture
def scene(mrml):
    return mrml.fresh()


@pytest.fixture
def volume(scene, mrml):
    su = mrml.slicer.util
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, SHAPE).astype(np.int16)
    node = su.addVolumeFromArray(array, ijkToRAS=oblique_lps_ijk_to_ras(), name="CT oblique")
    return node


@pytest.fixture
def adapters(mrml):
    import CitrusVMRML

    return CitrusVMRML


def segment_result(
    label="liver",
    slice_index=3,
    rows=slice(10, 20),
    cols=slice(15, 35),
    axis="axial",
    shape=SHAPE,
    index=1,
    task="segment",
):
    h, w = geometry.slice_shape(shape, axis)
    mask = np.zeros((h, w), dtype=bool)
    mask[rows, cols] = True
    return Result.from_json(
        {
            "task": task,
            "prompt": f"segment the {label}",
            "boxes": [
                {
                    "id": "b1",
                    "label": label,
                    "xyxy": [cols.start, rows.start, cols.stop, rows.stop],
                    "slice": slice_index,
                }
            ],
            "masks": [
                {
                    "label": label,
                    "label_index": index,
                    "slice": slice_index,
                    "rle": encode_rle(mask),
                }
            ],
            "image": {"id": "ct1", "shape": list(shape), "axis": axis, "slices": [slice_index]},
            "label_names": {label: index},
        }
    ), mask


def test_volume_geometry_is_read_from_the_node(adapters, volume):
    assert adapters.volume_shape(volume) == SHAPE
    assert np.allclose(adapters.ijk_to_ras(volume), oblique_lps_ijk_to_ras())


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_server_mask_lands_on_the_right_voxels(adapters, volume, mrml, axis):
    su = mrml.slicer.util
    result, mask = segment_result(axis=axis, slice_index=2, rows=slice(1, 4), cols=slice(5, 9))
    undo_steps = []
    applied = adapters.apply_result(
        result, volume, save_state_for_undo=lambda: undo_steps.append(1)
    )
    assert undo_steps == [1]  # one undo step per server result
    seg = applied.segmentation_node
    segment_id = applied.segment_ids["liver"]
    segment = seg.GetSegmentation().GetSegment(segment_id)
    assert segment.GetName() == "liver"
    assert np.allclose(segment.GetColor(), np.array([221, 130, 101]) / 255)
    back = su.arrayFromSegmentBinaryLabelmap(seg, segment_id, volume)
    expected = np.zeros(SHAPE, np.uint8)
    geometry.put_slice(expected, axis, 2, mask.astype(np.uint8))
    assert back.shape == SHAPE
    assert np.array_equal(back, expected)
    # and each of those voxels is where the RAS maths says: voxel (i, j, k) centre in RAS
    k, j, i = np.argwhere(back)[0]
    x, y, s = geometry.ijk_to_pixel(axis, [i, j, k])
    assert s == 2 and mask[int(y), int(x)]


def test_second_answer_on_another_slice_keeps_the_first(adapters, volume, mrml):
    su = mrml.slicer.util
    first, _ = segment_result(slice_index=1)
    second, _ = segment_result(slice_index=4, rows=slice(0, 5), cols=slice(0, 5))
    adapters.apply_result(first, volume)
    applied = adapters.apply_result(second, volume)
    seg = applied.segmentation_node
    # still one segmentation for the volume and one segment per structure
    assert len(su.getNodesByClass("vtkMRMLSegmentationNode")) == 1
    assert seg.GetSegmentation().GetNumberOfSegments() == 1
    back = su.arrayFromSegmentBinaryLabelmap(seg, applied.segment_ids["liver"], volume)
    assert back[1].sum() == 200 and back[4].sum() == 25 and back.sum() == 225
    # a new answer on slice 1 replaces that slice only
    third, _ = segment_result(slice_index=1, rows=slice(0, 2), cols=slice(0, 2))
    adapters.apply_result(third, volume)
    back = su.arrayFromSegmentBinaryLabelmap(seg, applied.segment_ids["liver"], volume)
    assert back[1].sum() == 4 and back[4].sum() == 25


def test_an_empty_closer_look_leaves_the_earlier_mask_as_it_was(adapters, volume, mrml):
    su = mrml.slicer.util
    first, _ = segment_result(slice_index=2)
    applied = adapters.apply_result(first, volume)
    closer, _ = segment_result(slice_index=2, rows=slice(0, 0), task="closer_look")
    assert closer.masks[0].array().sum() == 0
    kept = adapters.apply_result(closer, volume)
    assert kept.kept == ["liver"] and kept.segment_ids == {}
    back = su.arrayFromSegmentBinaryLabelmap(
        applied.segmentation_node, applied.segment_ids["liver"], volume)
    assert back[2].sum() == 200  # not wiped
    # a closer look that marks something replaces the slice as any answer does
    smaller, _ = segment_result(slice_index=2, rows=slice(10, 12), cols=slice(15, 20),
                                task="closer_look")
    done = adapters.apply_result(smaller, volume)
    assert done.kept == []
    back = su.arrayFromSegmentBinaryLabelmap(
        applied.segmentation_node, applied.segment_ids["liver"], volume)
    assert back[2].sum() == 10


def test_two_structures_get_two_segments_with_names_and_colors(adapters, volume, mrml):
    liver, _ = segment_result("liver", index=1)
    spleen, _ = segment_result("spleen", index=2, rows=slice(25, 30), cols=slice(40, 50))
    adapters.apply_result(liver, volume)
    applied = adapters.apply_result(spleen, volume)
    segmentation = applied.segmentation_node.GetSegmentation()
    names = [
        segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())
    ]
    assert names == ["liver", "spleen"]
    spleen_id = applied.segment_ids["spleen"]
    assert adapters.segment_label_index(applied.segmentation_node, spleen_id) == 2
    assert np.allclose(
        segmentation.GetSegment(spleen_id).GetColor(), np.array([157, 108, 162]) / 255
    )


def test_label_file_answer_is_used_for_whole_volume_results(adapters, volume, mrml):
    su = mrml.slicer.util
    label = np.zeros(SHAPE, np.uint8)
    label[1:5, 10:20, 15:35] = 1
    label[2, 30:35, 40:50] = 2
    result = Result.from_json(
        {
            "task": "segment",
            "masks": [
                {"label": "liver", "label_index": 1, "slice": None},
                {"label": "spleen", "label_index": 2, "slice": None},
            ],
            "image": {"axis": "axial", "slices": []},
            "label_names": {"liver": 1, "spleen": 2},
        }
    )
    lv = LabelVolume(label, adapters.ijk_to_ras(volume, world=False))
    applied = adapters.apply_result(result, volume, label_volume=lv)
    seg = applied.segmentation_node
    assert np.array_equal(
        su.arrayFromSegmentBinaryLabelmap(seg, applied.segment_ids["liver"], volume),
        (label == 1).astype(np.uint8),
    )
    assert su.arrayFromSegmentBinaryLabelmap(seg, applied.segment_ids["spleen"], volume).sum() == 50
    other = LabelVolume(label, np.eye(4))
    with pytest.raises(ValueError, match="geometry differs"):
        adapters.apply_result(result, volume, label_volume=other)


def test_box_roi_encloses_exactly_the_box_in_ras(adapters, volume, scene):
    result = Result.from_json(
        {
            "task": "detect",
            "boxes": [
                {"id": "b1", "label": "liver", "xyxy": [15.0, 10.0, 35.0, 20.0], "slice": 3},
                {"id": "b2", "label": "spleen", "xyxy": [40.5, 25.25, 55.0, 38.0], "slice": 2},
            ],
            "image": {"axis": "axial", "slices": [3]},
        }
    )
    applied = adapters.apply_result(result, volume)
    assert applied.segmentation_node is None
    m = adapters.ijk_to_ras(volume)
    for box in result.boxes:
        node = applied.roi_nodes[box.id]
        assert node.GetName() == box.name
        assert node.GetLocked() and not node.GetDisplayNode().GetHandlesInteractive()
        roi = adapters.roi_of_node(node)
        # the eight pixel-box corners (± half a slice) are the ROI node's corners
        x1, y1, x2, y2 = box.xyxy
        corners = np.array(
            [
                geometry.ijk_to_ras(m, [x - 0.5, y - 0.5, box.slice + dz])
                for x in (x1, x2)
                for y in (y1, y2)
                for dz in (-0.5, 0.5)
            ]
        )
        node_corners = roi.corners()
        for c in corners:
            assert np.min(np.linalg.norm(node_corners - c, axis=1)) < 1e-4
        # and back from the node to the same pixel box
        xyxy, s = geometry.roi_to_box(m, "axial", roi)
        assert np.allclose(xyxy, box.xyxy, atol=1e-4) and s == pytest.approx(box.slice, abs=1e-4)
        # RAS bounds of the node equal the bounds of the corners
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)
        assert np.allclose(bounds[0::2], corners.min(axis=0), atol=1e-4)
        assert np.allclose(bounds[1::2], corners.max(axis=0), atol=1e-4)
    # a new result replaces the previous boxes of this volume
    adapters.apply_result(
        Result.from_json(
            {
                "task": "detect",
                "boxes": [{"id": "b1", "label": "kidney", "xyxy": [1, 1, 5, 5], "slice": 0}],
            }
        ),
        volume,
    )
    names = [n.GetName() for n in adapters.roi_nodes(volume)]
    assert names == ["b1 kidney"]


def test_a_slice_range_detection_gives_one_3d_box_per_structure(adapters, volume, scene):
    """Over slices 1-4 a detection answer has a box per slice and structure: the scene gets
    one ROI per structure, the box around its boxes from its first slice to its last, not one
    per slice; the ROI knows its structure and its box ids."""
    boxes = [{"id": f"b{n + 1}", "label": label, "xyxy": xyxy, "slice": k}
             for n, (label, xyxy, k) in enumerate([
                 ("liver", [15.0, 10.0, 35.0, 20.0], 1), ("liver", [12.0, 11.0, 30.0, 24.0], 2),
                 ("spleen", [40.0, 25.0, 55.0, 38.0], 2), ("liver", [16.0, 9.0, 33.0, 22.0], 3)])]
    result = Result.from_json({"task": "detect", "boxes": boxes,
                               "image": {"axis": "axial", "slices": [1, 2, 3, 4]}})
    applied = adapters.apply_result(result, volume)
    nodes = adapters.roi_nodes(volume)
    assert [n.GetName() for n in nodes] == ["liver, slices 1-3 (3 boxes)",
                                            "spleen, slices 2-2 (1 box)"]
    liver, spleen = nodes
    assert applied.roi_nodes["b1"] is applied.roi_nodes["b4"] is liver
    assert liver.GetAttribute(adapters.BOX_ID_ATTR) == "b1,b2,b4"
    assert liver.GetAttribute(adapters.BOX_LABEL_ATTR) == "liver"
    m = adapters.ijk_to_ras(volume)
    corners = np.array([geometry.ijk_to_ras(m, [x - 0.5, y - 0.5, z])
                        for x in (12.0, 35.0) for y in (9.0, 24.0) for z in (0.5, 3.5)])
    node_corners = adapters.roi_of_node(liver).corners()
    for c in corners:
        assert np.min(np.linalg.norm(node_corners - c, axis=1)) < 1e-4
    # any of its box ids selects it
    adapters.select_boxes(volume, ["b2"], center=False)
    assert [bool(n.GetSelected()) for n in nodes] == [True, False]


def test_clicking_a_step_selects_its_boxes_and_centres_the_views(
    adapters, volume, scene, sample_result
):
    result = Result.from_json(sample_result)
    adapters.apply_result(result, volume)
    centre = adapters.select_boxes(volume, [b.id for b in result.boxes_for_step(1)])
    selected = {n.GetName(): bool(n.GetSelected()) for n in adapters.roi_nodes(volume)}
    assert selected == {"b1 liver 0.90": True, "b2 spleen 0.70": False}
    m = adapters.ijk_to_ras(volume)
    assert np.allclose(centre, geometry.box_center_ras(m, "axial", 3, [15, 10, 35, 20]), atol=1e-6)
    # the red view now shows slice 3 of the volume
    view = adapters.current_slice(volume, "Red")
    assert (view.axis, view.slice_index) == ("axial", 3)
    assert adapters.select_boxes(volume, ["b9"]) is None


def test_current_slice_of_each_view_and_jump(adapters, volume, scene, mrml):
    m = adapters.ijk_to_ras(volume)
    # align the three views with the (oblique) volume, as Slicer's "rotate to volume plane" does
    columns = m[:3, :3] / np.linalg.norm(m[:3, :3], axis=0)
    for view, axis in (("Red", "axial"), ("Green", "coronal"), ("Yellow", "sagittal")):
        node = adapters.slice_node(view)
        normal_axis = geometry.SLICE_IJK_AXIS[axis]
        x_axis, y_axis = [a for a in range(3) if a != normal_axis]
        s = np.eye(4)
        s[:3, 0], s[:3, 1], s[:3, 2] = (
            columns[:, x_axis],
            columns[:, y_axis],
            columns[:, normal_axis],
        )
        node.GetSliceToRAS().DeepCopy(mrml.slicer.util.vtkMatrixFromArray(s))
        node.UpdateMatrices()
    for view, axis, index in (
        ("Red", "axial", 4),
        ("Green", "coronal", 17),
        ("Yellow", "sagittal", 41),
    ):
        ras = adapters.jump_to_slice(volume, axis, index)
        got = adapters.current_slice(volume, view)
        assert (got.axis, got.slice_index, got.aligned) == (axis, index, True)
        # jumping centres every view on the middle of that slice
        assert np.allclose(geometry.ras_to_ijk(m, ras)[geometry.SLICE_IJK_AXIS[axis]], index)
    red = adapters.current_slice(volume, "Red")
    assert red.slice_index == 3  # the sagittal jump went through the middle of the K range
    with pytest.raises(ValueError, match="no Blue slice view"):
        adapters.slice_node("Blue")


def test_transformed_volume_uses_world_geometry_for_views(adapters, volume, scene, mrml):
    su = mrml.slicer.util
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = [0, 0, 25.0]
    transform.SetMatrixTransformToParent(su.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(adapters.ijk_to_ras(volume), shift @ oblique_lps_ijk_to_ras())
    assert np.allclose(adapters.ijk_to_ras(volume, world=False), oblique_lps_ijk_to_ras())
    # segments follow the volume's transform; boxes are placed in world RAS
    result, mask = segment_result(slice_index=2)
    applied = adapters.apply_result(result, volume)
    assert applied.segmentation_node.GetTransformNodeID() == transform.GetID()
    back = su.arrayFromSegmentBinaryLabelmap(
        applied.segmentation_node, applied.segment_ids["liver"], volume
    )
    assert np.array_equal(back[2] > 0, mask) and back.sum() == mask.sum()
    roi = adapters.roi_of_node(applied.roi_nodes["b1"])
    xyxy, s = geometry.roi_to_box(adapters.ijk_to_ras(volume), "axial", roi)
    assert np.allclose(xyxy, [15, 10, 35, 20], atol=1e-4) and s == pytest.approx(2, abs=1e-4)


def _exported_spleen(adapters, volume, tmp_path, index: int):
    """A spleen answer with this label index on slice 5, exported as a correction would be."""
    result, mask = segment_result("spleen", index=index, slice_index=5)
    applied = adapters.apply_result(result, volume)
    path, info = adapters.export_segment_label(
        applied.segmentation_node, applied.segment_ids["spleen"], volume, str(tmp_path)
    )
    return path, info, mask


def test_export_segment_writes_a_label_on_the_volume_grid(adapters, volume, tmp_path, mrml):
    path, info, mask = _exported_spleen(adapters, volume, tmp_path, 2)
    assert info == [{"name": "spleen", "idx": 2}]
    lv = read_label_volume(path)
    assert np.allclose(lv.ijk_to_ras, oblique_lps_ijk_to_ras(), atol=1e-6)
    assert lv.array.shape == SHAPE and set(np.unique(lv.array)) == {0, 2}
    assert np.array_equal(lv.array[5] == 2, mask) and lv.array.sum() == 2 * mask.sum()
    # the same file through pynrrd and through ITK-style LPS conventions
    import nrrd

    data, header = nrrd.read(path, index_order="C")
    assert np.array_equal(data, lv.array)
    assert np.allclose(header["space origin"], [-120.5, -98.0, 310.0])  # LPS as DICOM stores it
    assert header["space"] == "left-posterior-superior"


def test_export_keeps_a_label_index_over_255(adapters, volume, tmp_path, mrml):
    path, info, _ = _exported_spleen(adapters, volume, tmp_path, 300)
    assert info == [{"name": "spleen", "idx": 300}]
    assert set(np.unique(read_label_volume(path).array)) == {0, 300}  # not 44 (uint8)


def test_volume_written_for_upload_round_trips(adapters, volume, tmp_path, mrml):
    path = adapters.write_volume_for_upload(volume, str(tmp_path / "ct.nrrd"))
    lv = read_label_volume(path)
    assert np.array_equal(lv.array, mrml.slicer.util.arrayFromVolume(volume))
    assert lv.array.dtype == np.int16
    assert np.allclose(lv.ijk_to_ras, oblique_lps_ijk_to_ras())


def test_views_rotated_to_the_oblique_volume_step_through_its_axes(adapters, volume, scene):
    for view in ("Red", "Green", "Yellow"):
        assert not adapters.current_slice(volume, view).aligned  # default RAS views: oblique
    adapters.align_views_to_volume(volume)
    seen = set()
    for view in ("Red", "Green", "Yellow"):
        got = adapters.current_slice(volume, view)
        assert got.aligned
        seen.add(got.axis)
    assert seen == {"axial", "coronal", "sagittal"}
    adapters.jump_to_slice(volume, "axial", 5)
    assert adapters.current_slice(volume, "Red").slice_index == 5


RECORD = """Question: describe the liver, think step by step
Task: report
Model: citrusv-nano, version 1
Image: ct1 (axial slice 3)
Asked: 2026-11-27 17:40:00

Answer:
The liver is normal in size.

Reasoning:
1. Find the liver. [b1]
2. Compare with the spleen. [b1, b2]

Boxes (pixels of the slice: x1, y1, x2, y2):
b1 liver: slice 3, [15, 10, 35, 20], score 0.90
b2 spleen: slice 3, [40, 25, 55, 38], score 0.70

Masks:
liver: slice 3, 123.0 mm², 18 x 11 mm, score 0.91
"""


def test_each_answer_is_recorded_in_the_scene_and_saved_with_it(
    adapters, volume, scene, mrml, sample_result, tmp_path
):
    result = Result.from_json(sample_result)
    applied = adapters.apply_result(result, volume, when="2026-11-27 17:40:00")
    node = applied.text_node
    assert node.GetText() == RECORD
    assert node.GetName() == "Citrus-V report: describe the liver, think step by step"
    assert node.GetAttribute(adapters.MODEL_ATTR) == "citrusv-nano 1"
    assert node.GetAttribute(adapters.VOLUME_ATTR) == volume.GetID()
    # the segment says which model version and question made it
    seg = applied.segmentation_node.GetSegmentation().GetSegment(applied.segment_ids["liver"])
    import vtk

    tag = vtk.reference("")
    assert seg.GetTag(adapters.MODEL_ATTR, tag) and str(tag) == "citrusv-nano 1"
    assert seg.GetTag(adapters.PROMPT_ATTR, tag) and str(tag) == result.prompt
    # a second answer adds a record; the first stays (boxes are replaced, records are not)
    second = Result.from_json({**sample_result, "task": "detect", "prompt": "find the spleen",
                               "reasoning": [], "masks": [], "answer": "Here it is.",
                               "model": {"name": "citrusv-nano", "version": "1",
                                         "intended_use": "Demonstration only."}})
    adapters.apply_result(second, volume)
    records = adapters.answer_records(volume)
    assert [n.GetName() for n in records] == [node.GetName(), "Citrus-V detect: find the spleen"]
    assert ("Question: find the spleen\nTask: detect\nModel: citrusv-nano, version 1\n"
            "Intended use: Demonstration only.\nImage: ") in records[1].GetText()
    # saved with the scene: the text storage node writes it and reads it back unchanged
    storage = scene.AddNewNodeByClass("vtkMRMLTextStorageNode")
    storage.SetFileName(str(tmp_path / "answer.txt"))
    assert storage.WriteData(node)
    back = scene.AddNewNodeByClass("vtkMRMLTextNode")
    assert storage.ReadData(back)
    assert back.GetText() == RECORD
