"""The server and the engine agree. The server's reader (`monailabel_app/lib/images.py`) and
the engine's (`citrusv.io`, used by `citrusv ask`) give the same pixels for a DICOM:
MONOCHROME1 (low values shown white, as CR films often are) is mirrored at read, bone bright,
once for a whole series; they take as many closer-look boxes; and `citrusv ask` routes a
question to the same task with --server (the Slicer library's rule) as with --model (the
engine's)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom

from citrusv.io import read_study as engine_read
from tests.engine.test_io_overlay_cli import _dicom
from tests.server import APP_DIR, REPO

sys.path.insert(0, str(APP_DIR))
from lib.images import read_study as server_read  # noqa: E402


def test_a_monochrome1_series_is_mirrored_once_as_a_whole(tmp_path):
    for i, z in enumerate([0.0, 5.0, 10.0]):
        _dicom(tmp_path / f"im{i}.dcm", z, 1000 + 100 * i, photometric="MONOCHROME1")
    ours, theirs = engine_read(tmp_path), server_read(str(tmp_path))
    # stored 1000 / 1100 / 1200, rescaled -24 / 76 / 176 HU: the brightest slice as stored
    # shows darkest, and the slices keep one scale (not each mirrored in its own range)
    assert ours.array[:, 0, 0].tolist() == [176.0, 76.0, -24.0]
    np.testing.assert_array_equal(ours.array, theirs.array)
    assert ours.photometric == "MONOCHROME2"  # so `citrusv ask` does not mirror it again
    # MONOCHROME2 stays as stored
    for f in tmp_path.iterdir():
        f.unlink()
    for i, z in enumerate([0.0, 5.0]):
        _dicom(tmp_path / f"im{i}.dcm", z, 1000 + 100 * i)
    assert engine_read(tmp_path).array[:, 0, 0].tolist() == [-24.0, 76.0]
    np.testing.assert_array_equal(server_read(str(tmp_path)).array, engine_read(tmp_path).array)


def test_the_demo_radiograph_reads_alike(sample_root):
    path = Path(sample_root) / "studies" / "chest_xray.dcm"
    assert pydicom.dcmread(path).PhotometricInterpretation == "MONOCHROME1"
    ours, theirs = engine_read(path), server_read(str(path))
    np.testing.assert_array_equal(ours.array, theirs.array[0])
    assert ours.photometric == "MONOCHROME2" and ours.modality == "CR"
    # the stored values mirrored within their range (the file has no rescale)
    stored = pydicom.dcmread(path).pixel_array.astype(np.float32)
    np.testing.assert_array_equal(ours.array, stored.max() + stored.min() - stored)


def test_a_16_bit_png_keeps_its_values(tmp_path):
    """A grayscale PNG of 16 bits a pixel (a CT slice exported in HU + 1024) keeps its values
    in both readers; the server's turned it into 8-bit RGB, clipping every value over 255."""
    from PIL import Image

    values = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)  # 0 .. 61420
    path = tmp_path / "slice.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    ours, theirs = engine_read(path), server_read(str(path))
    np.testing.assert_array_equal(ours.array, values)
    np.testing.assert_array_equal(theirs.array, values[None])
    # 8 bits a pixel stays a picture of 0-255 (RGB in the server)
    Image.fromarray((values // 256).astype(np.uint8)).save(path)
    np.testing.assert_array_equal(server_read(str(path)).array[0, ..., 1], values // 256)


def test_the_slicer_module_names_languages_as_the_engine_does():
    """The connection line names a model's languages (/info/ `citrusv.languages`) as the
    engine's sentence on a question in another language does."""
    import ast

    from citrusv.parsing import LANGUAGE_NAMES

    tree = ast.parse((REPO / "slicer_extension/CitrusV/CitrusV.py").read_text())
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "LANGUAGES")
    assert names == LANGUAGE_NAMES


def test_server_and_engine_allow_as_many_closer_look_boxes():
    """A roi list the server lets through, the engine takes (one pass per box)."""
    from citrusv.engine import MAX_CLOSER_LOOK_ROIS
    from lib.params import MAX_ROIS

    assert MAX_ROIS == MAX_CLOSER_LOOK_ROIS == 8


def test_a_question_goes_to_the_same_task_with_or_without_a_server():
    from CitrusVLib.headless import guess_task

    from citrusv.parsing import infer_task

    examples = json.loads((REPO / "models/nano/example_prompts.json").read_text())
    for task, prompts in examples.items():  # the questions the product suggests
        for p in prompts:
            assert (infer_task(p), guess_task(p)) == (task, task), p
    for p, task in [("Where is the spleen? Output its mask.", "segment"),
                    ("where are the kidneys", "detect"),
                    ("How many kidneys are there?", "detect"),
                    ("Summarise this slice.", "report"),
                    ("Delineate the aorta", "segment"),
                    ("Identify the liver and the spleen.", "detect"),
                    ("Identify the findings.", "report"),
                    ("Show me the spleen.", "detect"),
                    ("What structures are visible?", "report"),
                    ("What do you see?", "report"),
                    ("Label the spleen.", "segment"), ("Please paint the liver.", "segment"),
                    ("Draw a box around the liver.", "detect"), ("liver bbox", "detect"),
                    ("Is there trace ascites?", "report"), ("What label is this?", "report"),
                    ("Which kidney is larger?", "segment"), ("Compare the lungs.", "segment"),
                    ("Is the heart larger than normal?", "report"),
                    ("List all organs on this slice.", "report"),
                    ("What's in the image?", "report"),
                    ("Point out the aorta.", "detect"),
                    ("Does this show a lesion?", "report"),
                    ("Highlight the liver.", "segment"),
                    ("How big is the liver?", "segment"),
                    ("What is the size of the heart?", "segment"),
                    ("Is there a pleural effusion?", "report"),
                    ("liver", "report"),
                    # a misspelt task word opening a question with none
                    ("Segmnet the liver.", "segment"),
                    ("Please locte the spleen.", "detect"),
                    ("Descirbe this slice.", "report"),
                    ("Can you higlight the heart?", "segment"),
                    ("Identity of this structure?", "report"),
                    ("Delete the liver.", "report"),
                    # task words with a slip of one key, anywhere: letters swapped
                    ("Where is the spleen? Output its maks.", "segment"),
                    ("Pleaes sgement the liver.", "segment"),
                    ("Is it there? Tell me wehre the liver is.", "detect"),
                    ("Write a reprot.", "report"),
                    # one letter dropped or doubled
                    ("Where is the liver? Output its maskk.", "segment"),
                    ("Please segmet the liver.", "segment"),
                    ("Can you locatte the spleen?", "detect"),
                    ("Were the kidneys there?", "report"),
                    # a structure's volume: a mask (over a range, its volume in mL)
                    ("What is the volume of the spleen?", "segment"),
                    ("Liver volume?", "segment"),
                    ("Find the liver in this volume.", "detect"),
                    ("Is this the whole volume?", "report")]:
        assert (infer_task(p), guess_task(p)) == (task, task), p
    # the copy's lists of task words a misspelt one is read as, and of words left alone
    from CitrusVLib import headless

    from citrusv import parsing

    assert headless._TASK_VERBS == parsing.TASK_VERBS
    assert headless._NOT_TASK_TYPOS == parsing._NOT_TASK_TYPOS
    assert headless._OPENING.pattern == parsing._OPENING.pattern
    assert headless._TASK_SPELLINGS == parsing._TASK_SPELLINGS
    # _NOT_TASK_SLIPS: test_the_slicer_library_leaves_the_same_words_as_typed
    assert all(headless._slips(w) == parsing.slips(w) for w in ("repor", "lvier", "spleeen"))


def test_the_slicer_library_leaves_the_same_words_as_typed():
    """The words one slip away from a task word that the engine reads as typed (English
    words, `_NOT_SLIPS`, and anatomy words it knows: "organ", "structure") are those the
    Slicer library's copy leaves alone: "Which organ is the largest?" was read "which
    organs", a report question, by the library only."""
    from CitrusVLib import headless

    from citrusv import parsing

    near = set()
    for t in parsing._TASK_SPELLINGS:
        near |= {t[:i] + t[i + 1] + t[i] + t[i + 2:] for i in range(len(t) - 1)}
        near |= {t[:i] + t[i + 1:] for i in range(len(t))}
        near |= {t[:i] + t[i] + t[i:] for i in range(len(t))}
    near = {w for w in near if len(w) >= 4 and w not in parsing._TASK_SPELLINGS}
    as_typed = {w for w in near if w in parsing._NOT_SLIPS or parsing._known(w)}
    assert as_typed == headless._NOT_TASK_SLIPS
    assert headless.guess_task("Which organ is the largest?") == "segment"


def test_the_slicer_library_reads_a_pixel_size_as_the_engine_does():
    """The Slicer library carries its own copy of `citrusv.io.pixel_spacing` (Slicer's Python
    has no citrusv package): the same images have no pixel size on both sides."""
    from pydicom.dataset import Dataset

    sys.path.insert(0, str(REPO / "slicer_extension" / "CitrusV"))
    from CitrusVLib.label_io import pixel_size as slicer_pixel_size

    from citrusv.io import pixel_spacing

    cases = [{"PixelSpacing": [0.7, 0.8]}, {"PixelSpacing": [0, 0]},
             {"PixelSpacing": [0, 0], "ImagerPixelSpacing": [0.15, 0.15]},
             {"ImagerPixelSpacing": [0.2, 0.3]}, {}, {"PixelSpacing": [0.5]}]
    for case in cases:
        ds = Dataset()
        for key, value in case.items():
            setattr(ds, key, value)
        assert slicer_pixel_size(ds) == pixel_spacing(ds), case
        # as Slicer's DICOM database gives the values: text, several values split by "\\"
        text = {key: "\\".join(str(v) for v in value) for key, value in case.items()}
        assert slicer_pixel_size(text) == pixel_spacing(ds), case


def test_the_slicer_library_writes_the_modality_the_server_reads(tmp_path):
    """Slicer uploads carry the DICOM Modality as an NRRD key; the two sides' patterns for it
    are copies (Slicer's Python has no server code), so they are kept equal here."""
    from CitrusVLib.label_io import MODALITY, LabelVolume, write_label_volume
    from lib.images import NRRD_MODALITY

    assert MODALITY.pattern == NRRD_MODALITY.pattern
    array = np.zeros((1, 4, 5), np.int16)
    for sent, read in (("CR", "CR"), ("", ""), ("C R", "")):
        path = write_label_volume(tmp_path / f"m{len(sent)}.nrrd",
                                  LabelVolume(array, np.eye(4), modality=sent))
        assert server_read(str(path)).modality == read


def test_the_slicer_library_writes_an_unknown_pixel_size_the_server_reads(tmp_path):
    """An upload of an image whose DICOM files give no pixel size says so (Slicer places it at
    1 mm); the server then measures nothing in mm, as for the DICOM file itself."""
    from CitrusVLib.label_io import PIXEL_SIZE_UNKNOWN, LabelVolume, upload_id, write_label_volume
    from lib.images import NRRD_NO_PIXEL_SIZE

    assert PIXEL_SIZE_UNKNOWN == NRRD_NO_PIXEL_SIZE
    array = np.zeros((1, 4, 5), np.int16)
    volumes = [LabelVolume(array, np.eye(4), modality="CR", pixel_size_known=known)
               for known in (True, False)]
    for volume in volumes:
        path = write_label_volume(tmp_path / f"p{volume.pixel_size_known}.nrrd", volume)
        assert server_read(str(path)).spacing_known is volume.pixel_size_known
    # two uploads, not one image under one id
    assert upload_id("cr", volumes[0]) != upload_id("cr", volumes[1])
