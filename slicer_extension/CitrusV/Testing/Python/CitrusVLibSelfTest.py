"""CitrusVLib inside Slicer's own Python: geometry, RLE and MRML placement on a real scene.

The same behaviours are tested with pytest outside Slicer (tests/slicer); this proves the
library and adapters import and agree with the running Slicer's MRML.
"""

import unittest

import CitrusVMRML
import numpy as np
import slicer
from CitrusVLib import Result, decode_rle, encode_rle, geometry


class CitrusVLibSelfTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_rle_round_trip(self):
        mask = np.zeros((7, 9), bool)
        mask[2:5, 3:8] = True
        self.assertTrue(np.array_equal(decode_rle(encode_rle(mask)), mask))

    def test_mask_lands_on_voxels_of_an_oblique_lps_volume(self):
        angle = np.radians(20)
        direction = np.array(
            [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
        )
        m = geometry.ijk_to_ras_matrix([-100, -80, 200], [0.8, 0.8, 2.5], direction, lps=True)
        volume = slicer.util.addVolumeFromArray(np.zeros((5, 30, 40), np.int16), ijkToRAS=m)
        mask = np.zeros((30, 40), bool)
        mask[5:9, 10:20] = True
        result = Result.from_json(
            {
                "task": "segment",
                "masks": [
                    {"label": "liver", "label_index": 1, "slice": 3, "rle": encode_rle(mask)}
                ],
                "boxes": [{"id": "b1", "label": "liver", "xyxy": [10, 5, 20, 9], "slice": 3}],
                "image": {"axis": "axial", "slices": [3]},
            }
        )
        applied = CitrusVMRML.apply_result(result, volume)
        back = slicer.util.arrayFromSegmentBinaryLabelmap(
            applied.segmentation_node, applied.segment_ids["liver"], volume
        )
        self.assertEqual(int(back[3].sum()), 40)
        self.assertTrue(np.array_equal(back[3] > 0, mask))
        roi = CitrusVMRML.roi_of_node(applied.roi_nodes["b1"])
        box, s = geometry.roi_to_box(CitrusVMRML.ijk_to_ras(volume), "axial", roi)
        self.assertTrue(np.allclose(box, [10, 5, 20, 9], atol=1e-3))
        self.assertAlmostEqual(s, 3, places=3)


def runTest():
    unittest.main(module=__name__, exit=False, argv=["CitrusVLibSelfTest"])


if __name__ == "__main__":
    runTest()
