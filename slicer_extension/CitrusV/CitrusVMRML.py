"""MRML side of Citrus-V: volumes, slice views, segmentations and ROIs ↔ CitrusVLib objects.

Uses ``slicer.util`` and MRML only (no Qt), so it runs in Slicer and against ``slicer-core``.
Everything that is plain maths lives in CitrusVLib; this module only moves data into nodes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import slicer
import vtk
from CitrusVLib import geometry
from CitrusVLib.colors import label_color_float
from CitrusVLib.label_io import LabelVolume, pixel_size, write_label_volume
from CitrusVLib.placement import StructureMask, structure_masks, structure_masks_from_label_volume
from CitrusVLib.result import Box, Result, range_boxes

VOLUME_ATTR = "CitrusV.VolumeID"  # on segmentation / ROI nodes: the volume they belong to
IMAGE_ID_ATTR = "CitrusV.ImageID"  # on volume nodes: the server datastore id
# on volume nodes downloaded from the server: its image's stamp then (CitrusVClient.image_stamp:
# a digest of its bytes; from a server that gives none, of its files' names, sizes, times)
IMAGE_STAT_ATTR = "CitrusV.ImageStat"
BOX_ID_ATTR = "CitrusV.BoxID"  # on ROI nodes: the result's box id (b1, b2, ...; "b1,b3,...")
BOX_LABEL_ATTR = "CitrusV.BoxLabel"  # on ROI nodes: the structure the box is of
LABEL_INDEX_TAG = "CitrusV.LabelIndex"
MODEL_ATTR = "CitrusV.Model"  # on answer text nodes, and a tag on segments: "name version"
PROMPT_ATTR = "CitrusV.Prompt"  # the question that made it
TASK_ATTR = "CitrusV.Task"
VIEW_NAMES = ("Red", "Yellow", "Green")


def _scene(scene: slicer.vtkMRMLScene | None) -> slicer.vtkMRMLScene:
    return scene if scene is not None else slicer.mrmlScene


# -- geometry --------------------------------------------------------------------------------
def ijk_to_ras(volume_node: slicer.vtkMRMLVolumeNode, world: bool = True) -> np.ndarray:
    """The volume's IJK-to-RAS 4×4; ``world=True`` includes a linear parent transform."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    transform = volume_node.GetParentTransformNode()
    if world and transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise ValueError(
                f"Volume '{volume_node.GetName()}' is under a non-linear transform: "
                "harden or remove it before asking Citrus-V."
            )
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        m = slicer.util.arrayFromVTKMatrix(to_world) @ m
    return m


def volume_shape(volume_node: slicer.vtkMRMLVolumeNode) -> tuple[int, int, int]:
    """Array shape ``(k, j, i)`` of a volume node."""
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"Volume '{volume_node.GetName()}' has no image data.")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def slice_node(view_name: str = "Red", scene: slicer.vtkMRMLScene | None = None):
    """The slice node of the Red/Yellow/Green view (by singleton id, then by layout name)."""
    scene = _scene(scene)
    node = scene.GetNodeByID(f"vtkMRMLSliceNode{view_name}")
    if node is not None:
        return node
    for candidate in slicer.util.getNodesByClass("vtkMRMLSliceNode", scene):
        if candidate.GetLayoutName() == view_name or candidate.GetName() == view_name:
            return candidate
    raise ValueError(f"There is no {view_name} slice view in this layout.")


def current_slice(
    volume_node: slicer.vtkMRMLVolumeNode,
    view_name: str = "Red",
    scene: slicer.vtkMRMLScene | None = None,
) -> geometry.ViewSlice:
    """Axis and slice index the view shows of this volume (any volume/view orientation)."""
    node = slice_node(view_name, scene)
    slice_to_ras = slicer.util.arrayFromVTKMatrix(node.GetSliceToRAS())
    return geometry.slice_for_view(ijk_to_ras(volume_node), slice_to_ras, volume_shape(volume_node))


def align_views_to_volume(
    volume_node: slicer.vtkMRMLVolumeNode,
    scene: slicer.vtkMRMLScene | None = None,
    view_names: Sequence[str] = VIEW_NAMES,
) -> None:
    """Rotate the slice views onto the volume's own planes, so each steps through one index axis."""
    for name in view_names:
        try:
            node = slice_node(name, scene)
        except ValueError:
            continue
        node.RotateToVolumePlane(volume_node)


def jump_to_slice(
    volume_node: slicer.vtkMRMLVolumeNode,
    axis: str,
    slice_index: int,
    scene: slicer.vtkMRMLScene | None = None,
) -> np.ndarray:
    """Centre all slice views on the middle of slice ``slice_index``; returns that RAS point."""
    ras = geometry.slice_center_ras(
        ijk_to_ras(volume_node), volume_shape(volume_node), axis, slice_index
    )
    jump_to_ras(ras, scene)
    return ras


def jump_to_ras(ras: Sequence[float], scene: slicer.vtkMRMLScene | None = None) -> None:
    r, a, s = (float(v) for v in ras)
    slicer.vtkMRMLSliceNode.JumpAllSlices(
        _scene(scene), r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice
    )


# -- volumes for the server --------------------------------------------------------------------
def volume_snapshot(volume_node: slicer.vtkMRMLVolumeNode) -> LabelVolume:
    """A copy of the voxels + own geometry (no parent transform): safe to hand to a worker."""
    array = slicer.util.arrayFromVolume(volume_node)
    return LabelVolume(np.array(array), ijk_to_ras(volume_node, world=False),
                       modality=dicom_modality(volume_node),
                       pixel_size_known=dicom_pixel_size_known(volume_node))


# the tags Slicer's DICOM database is asked for, as it names them
_SOP_INSTANCE_UID, _PIXEL_SPACING, _IMAGER_PIXEL_SPACING = "0008,0018", "0028,0030", "0018,1164"


def dicom_pixel_size_known(volume_node, database=None) -> bool:
    """Whether the volume's pixel size in Slicer is its DICOM image's, by the server's rule
    (PixelSpacing, else ImagerPixelSpacing, two positive numbers); the upload says so when not,
    and the server then measures nothing in mm, as it would reading the DICOM file. False
    where the DICOM files give no pixel size (the sample CR: Slicer shows it at 1 mm, which is
    no size), and where Slicer shows another: its reader (ITK's GDCMImageIO) takes a CR's
    ImagerPixelSpacing only, so a CR with PixelSpacing 0.2 and no ImagerPixelSpacing is shown
    at 1 mm, and one with both at the ImagerPixelSpacing. True otherwise, and wherever
    Slicer's DICOM database (``slicer.dicomDatabase``) cannot say: a volume not loaded from
    DICOM, no database, an instance the database no longer holds."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    database = database if database is not None else getattr(slicer, "dicomDatabase", None)
    if not uids or database is None:
        return True
    try:
        if not database.instanceValue(uids[0], _SOP_INSTANCE_UID):
            return True  # not in the database (any more)
        values = {"PixelSpacing": database.instanceValue(uids[0], _PIXEL_SPACING),
                  "ImagerPixelSpacing": database.instanceValue(uids[0], _IMAGER_PIXEL_SPACING)}
    except RuntimeError:  # an instance the database cannot reach
        return True
    size = pixel_size(values)  # (row, column) mm
    if size is None:
        return False
    column, row = (float(v) for v in volume_node.GetSpacing()[:2])  # along i, j
    return bool(np.allclose([row, column], size, rtol=1e-3, atol=0))


def dicom_modality(volume_node, scene: slicer.vtkMRMLScene | None = None) -> str:
    """The Modality ("CR", "CT", "MR", ...) that Slicer's DICOM module recorded on the volume's
    series item, or "" for a volume that was not loaded from DICOM."""
    scene = volume_node.GetScene() or _scene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(volume_node) if sh is not None else 0
    if not item:
        return ""
    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    return (sh.GetItemAttribute(item, name) or "").strip().upper()


def dicom_series_uid(volume_node, scene: slicer.vtkMRMLScene | None = None) -> str | None:
    """The SeriesInstanceUID that Slicer's DICOM module recorded for the volume (the "DICOM" UID
    of its subject hierarchy item), or None for a volume that was not loaded from DICOM."""
    scene = volume_node.GetScene() or _scene(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(volume_node) if sh is not None else 0
    if not item:
        return None
    uid = sh.GetItemUID(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMUIDName())
    return uid or None


def write_volume_for_upload(volume_node: slicer.vtkMRMLVolumeNode, path: str) -> str:
    """Write the volume (own geometry, no parent transform) as NRRD for ``upload_image``."""
    return write_label_volume(path, volume_snapshot(volume_node))


# -- segmentations -----------------------------------------------------------------------------
def find_segmentation(volume_node, scene: slicer.vtkMRMLScene | None = None):
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode", _scene(scene)):
        if node.GetAttribute(VOLUME_ATTR) == volume_node.GetID():
            return node
    return None


def get_or_create_segmentation(volume_node, scene: slicer.vtkMRMLScene | None = None):
    """The one Citrus-V segmentation node of this volume (created on first use)."""
    scene = _scene(scene)
    node = find_segmentation(volume_node, scene)
    if node is None:
        node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", f"{volume_node.GetName()} Citrus-V"
        )
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        node.SetAttribute(VOLUME_ATTR, volume_node.GetID())
    # labelmaps are stored in the volume's own (node) coordinates: follow its transform
    if node.GetTransformNodeID() != volume_node.GetTransformNodeID():
        node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    return node


def ensure_segment(segmentation_node, label: str, label_index: int) -> str:
    """Segment id for structure ``label`` (named after it, coloured from CitrusVLib.colors)."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(label)
    if not segment_id:
        segment_id = segmentation.AddEmptySegment(
            label, label, label_color_float(label, label_index)
        )
    segment = segmentation.GetSegment(segment_id)
    segment.SetTag(LABEL_INDEX_TAG, str(int(label_index)))
    return segment_id


def segment_label_index(segmentation_node, segment_id: str) -> int:
    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    value = vtk.reference("")
    if segment is not None and segment.GetTag(LABEL_INDEX_TAG, value) and str(value):
        return int(str(value))
    return segmentation_node.GetSegmentation().GetSegmentIndex(segment_id) + 1


def segment_array(segmentation_node, segment_id: str, volume_node) -> np.ndarray:
    """The segment as a uint8 ``[k, j, i]`` array on the volume's grid."""
    return np.asarray(
        slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume_node)
    )


def write_structures(
    structures: Iterable[StructureMask],
    volume_node,
    segmentation_node,
) -> dict[str, str]:
    """Write structure masks into segments; 2D answers replace only their slices."""
    ids: dict[str, str] = {}
    for structure in structures:
        segment_id = ensure_segment(segmentation_node, structure.label, structure.label_index)
        existing = None
        if structure.slices:
            try:
                existing = segment_array(segmentation_node, segment_id, volume_node)
            except RuntimeError:
                existing = None
        merged = structure.merge_into(existing)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            merged, segmentation_node, segment_id, volume_node
        )
        ids[structure.label] = segment_id
    return ids


# -- ROIs --------------------------------------------------------------------------------------
def roi_nodes(volume_node, scene: slicer.vtkMRMLScene | None = None) -> list:
    return [
        n
        for n in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode", _scene(scene))
        if n.GetAttribute(VOLUME_ATTR) == volume_node.GetID()
    ]


def set_roi(roi_node, roi: geometry.RoiRAS) -> None:
    """Place an ROI node on an oriented RAS box (orientation + centre, then size)."""
    roi_node.SetAndObserveObjectToNodeMatrix(slicer.util.vtkMatrixFromArray(roi.object_to_world()))
    roi_node.SetCenter(*(float(v) for v in roi.center))
    roi_node.SetSize(*(float(v) for v in roi.size))


def roi_of_node(roi_node) -> geometry.RoiRAS:
    """The RAS box an ROI node encloses (e.g. after the user moved it)."""
    center = [0.0, 0.0, 0.0]
    roi_node.GetCenterWorld(center)
    axes = np.zeros((3, 3))
    for n, getter in enumerate(
        (roi_node.GetXAxisWorld, roi_node.GetYAxisWorld, roi_node.GetZAxisWorld)
    ):
        v = [0.0, 0.0, 0.0]
        getter(v)
        axes[:, n] = v
    size = [0.0, 0.0, 0.0]
    roi_node.GetSizeWorld(size)
    return geometry.RoiRAS(np.array(center), np.array(size), axes)


def create_box_rois(
    boxes: Sequence[Box],
    volume_node,
    axis: str,
    default_slice: int | None = None,
    scene: slicer.vtkMRMLScene | None = None,
    interactive: bool = False,
    replace: bool = True,
    per_structure: bool = False,
) -> dict[str, object]:
    """One ``vtkMRMLMarkupsROINode`` per box, named ``b1 liver``; locked unless ``interactive``.
    ``per_structure`` (a slice-range answer: a box per slice): one node per structure instead,
    the 3D box around its boxes (``range_boxes``), named ``liver, slices 40-60 (21 boxes)``;
    the returned dict maps each of its box ids to it."""
    scene = _scene(scene)
    if replace:
        for old in roi_nodes(volume_node, scene):
            scene.RemoveNode(old)
    m = ijk_to_ras(volume_node)
    nodes: dict[str, object] = {}
    placed = []  # (ids, label, name, roi)
    if per_structure:
        for r in range_boxes(list(boxes)):
            roi = geometry.box_to_roi(m, axis, (r.first + r.last) / 2, r.xyxy,
                                      thickness_slices=r.last - r.first + 1)
            placed.append((r.ids, r.label, r.name, roi))
    else:
        for box in boxes:
            slice_index = box.slice if box.slice is not None else default_slice
            if slice_index is None:
                raise ValueError(f"Box {box.id} has no slice index.")
            placed.append(([box.id], box.label, box.name,
                           geometry.box_to_roi(m, axis, slice_index, box.xyxy)))
    for n, (ids, label, name, roi) in enumerate(placed):
        node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
        node.CreateDefaultDisplayNodes()
        set_roi(node, roi)
        node.SetAttribute(VOLUME_ATTR, volume_node.GetID())
        node.SetAttribute(BOX_ID_ATTR, ",".join(ids))
        node.SetAttribute(BOX_LABEL_ATTR, label)
        node.SetLocked(not interactive)
        display = node.GetDisplayNode()
        if display is not None:
            display.SetHandlesInteractive(interactive)
            display.SetSelectedColor(label_color_float(label, n + 1))
            display.SetFillOpacity(0.05)
        nodes.update(dict.fromkeys(ids, node))
    return nodes


def select_boxes(
    volume_node,
    box_ids: Iterable[str],
    scene: slicer.vtkMRMLScene | None = None,
    center: bool = True,
) -> np.ndarray | None:
    """Select the ROIs of these boxes (others deselected) and centre the views on them."""
    wanted = set(box_ids)
    centres = []
    for node in roi_nodes(volume_node, scene):
        selected = bool(set((node.GetAttribute(BOX_ID_ATTR) or "").split(",")) & wanted)
        node.SetSelected(selected)
        if selected:
            c = [0.0, 0.0, 0.0]
            node.GetCenterWorld(c)
            centres.append(c)
    if not centres:
        return None
    ras = np.mean(np.array(centres), axis=0)
    if center:
        jump_to_ras(ras, scene)
    return ras


# -- one server result -------------------------------------------------------------------------
@dataclass
class AppliedResult:
    segmentation_node: object | None
    segment_ids: dict[str, str] = field(default_factory=dict)
    roi_nodes: dict[str, object] = field(default_factory=dict)
    text_node: object | None = None  # the answer's record (saved with the scene)
    # structures a closer look came back empty for: their earlier mask was left as it was
    kept: list[str] = field(default_factory=list)


def _model_name(result: Result) -> str:
    model = result.model or {}
    return f"{model.get('name', '?')} {model.get('version', '?')}"


def answer_records(volume_node, scene: slicer.vtkMRMLScene | None = None) -> list:
    """The text nodes that record the answers about this volume, oldest first."""
    scene = _scene(scene)
    nodes = scene.GetNodesByClass("vtkMRMLTextNode")
    found = [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]
    return [n for n in found if n.GetAttribute(VOLUME_ATTR) == volume_node.GetID()
            and n.GetAttribute(TASK_ATTR)]


def record_answer(result: Result, volume_node, scene: slicer.vtkMRMLScene | None = None,
                  when: str | None = None):
    """A ``vtkMRMLTextNode`` holding ``result.record()`` (question, model version, answer,
    reasoning, boxes, masks), tied to the volume; kept with the scene when it is saved, one per
    answer, so the report a radiologist read and who made it stay with their work."""
    scene = _scene(scene)
    prompt = " ".join(result.prompt.split())
    short = prompt if len(prompt) <= 48 else prompt[:47] + "…"
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", f"Citrus-V {result.task}: {short}")
    node.SetText(result.record(when or time.strftime("%Y-%m-%d %H:%M:%S")))
    node.SetAttribute(VOLUME_ATTR, volume_node.GetID())
    node.SetAttribute(TASK_ATTR, result.task)
    node.SetAttribute(MODEL_ATTR, _model_name(result))
    node.SetAttribute(PROMPT_ATTR, prompt)
    return node


def apply_result(
    result: Result,
    volume_node,
    label_volume: LabelVolume | None = None,
    save_state_for_undo: Callable[[], None] | None = None,
    scene: slicer.vtkMRMLScene | None = None,
    when: str | None = None,
) -> AppliedResult:
    """Put one server answer into the scene as a single undo step: segments (tagged with the
    model version and question) + box ROIs + the answer's text record (``record_answer``).

    ``save_state_for_undo`` is the Segment Editor's (in Slicer); the scene's undo otherwise.
    """
    scene = _scene(scene)
    axis = result.image.axis or "axial"
    shape = volume_shape(volume_node)
    if save_state_for_undo is not None:
        save_state_for_undo()
    elif scene.GetUndoFlag():
        scene.SaveStateForUndo()
    if result.masks and all(mk.rle is not None for mk in result.masks):
        structures = structure_masks(result, shape, axis)
    elif label_volume is not None:
        structures = structure_masks_from_label_volume(
            label_volume,
            result.labels(),
            ijk_to_ras(volume_node, world=False),
            slices=result.image.slices,
            axis=axis,
        )
    else:
        structures = structure_masks(result, shape, axis)
    applied = AppliedResult(segmentation_node=None)
    if result.task == "closer_look":
        # an empty closer look would wipe that slice of the segment (perhaps the user's own
        # edits); a model not trained on crops (nano) often answers so. The answer's warning
        # says why; the earlier mask stays.
        applied.kept = [name for name, st in structures.items() if not st.mask.any()]
        structures = {name: st for name, st in structures.items() if name not in applied.kept}
    if structures:
        seg = get_or_create_segmentation(volume_node, scene)
        applied.segmentation_node = seg
        applied.segment_ids = write_structures(structures.values(), volume_node, seg)
        for segment_id in applied.segment_ids.values():
            segment = seg.GetSegmentation().GetSegment(segment_id)
            segment.SetTag(MODEL_ATTR, _model_name(result))
            segment.SetTag(PROMPT_ATTR, " ".join(result.prompt.split()))
    if result.boxes:
        default_slice = (
            result.image.slices[0]
            if result.image.slices
            else (0 if shape[geometry.AXES.index(axis)] == 1 else None)
        )
        applied.roi_nodes = create_box_rois(result.boxes, volume_node, axis, default_slice, scene,
                                            per_structure=len(result.image.slices) > 1)
    applied.text_node = record_answer(result, volume_node, scene, when)
    return applied


# -- corrections -------------------------------------------------------------------------------
def export_segment_label(
    segmentation_node,
    segment_id: str,
    volume_node,
    directory: str,
    label_index: int | None = None,
    extension: str = ".nrrd",
) -> tuple[str, list[dict]]:
    """Write one segment as a label file on the volume's own grid; returns path + label_info."""
    name = segmentation_node.GetSegmentation().GetSegment(segment_id).GetName()
    index = int(
        label_index
        if label_index is not None
        else segment_label_index(segmentation_node, segment_id)
    )
    mask = segment_array(segmentation_node, segment_id, volume_node) > 0
    label = mask.astype(np.uint16 if index > 255 else np.uint8) * index  # uint8 wrapped 300 to 44
    safe = "".join(ch if ch.isalnum() else "_" for ch in name) or "label"
    path = os.path.join(directory, f"{safe}{extension}")
    write_label_volume(path, LabelVolume(label, ijk_to_ras(volume_node, world=False)))
    return path, [{"name": name, "idx": index}]
