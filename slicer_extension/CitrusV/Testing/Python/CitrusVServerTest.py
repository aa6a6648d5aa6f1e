"""Runs CitrusVTest (CitrusV.py) against the server in CITRUSV_SERVER_URL; skips without one."""

import os
import unittest

import slicer


class CitrusVServerTest(unittest.TestCase):
    @unittest.skipUnless(os.environ.get("CITRUSV_SERVER_URL"), "CITRUSV_SERVER_URL is not set")
    def test_widget_against_server(self):
        slicer.util.selectModule("CitrusV")
        test = slicer.util.getModuleTest("CitrusV")
        test.runTest()


def runTest():
    unittest.main(module=__name__, exit=False, argv=["CitrusVServerTest"])


if __name__ == "__main__":
    runTest()
