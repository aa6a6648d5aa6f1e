"""Fixtures for the Slicer library and MRML adapter tests."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

EXTENSION = Path(__file__).resolve().parents[2] / "slicer_extension" / "CitrusV"
if str(EXTENSION) not in sys.path:  # CitrusVMRML sits next to CitrusV.py, like in Slicer
    sys.path.insert(0, str(EXTENSION))


def oblique_lps_ijk_to_ras(angle_deg: float = 23.0) -> np.ndarray:
    """IJK-to-RAS of a DICOM-like volume stored in LPS, tilted about two axes, anisotropic."""
    from CitrusVLib.geometry import ijk_to_ras_matrix

    a, b = np.radians(angle_deg), np.radians(angle_deg / 2)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return ijk_to_ras_matrix([-120.5, -98.0, 310.0], [0.78, 0.82, 2.5], rz @ rx, lps=True)


@pytest.fixture(scope="session")
def mrml():
    """A Slicer-like application context on slicer-core: scene, module logics, slice views.

    slicer-core has the MRML classes and slicer.util but not the app singletons; set them the
    way the Slicer application does at start-up.
    """
    slicer = pytest.importorskip("slicer")
    import types

    state = {name: getattr(slicer, name, None) for name in ("mrmlScene", "modules")}

    def fresh():
        scene = slicer.vtkMRMLScene()
        volumes_logic = slicer.vtkSlicerVolumesLogic()
        volumes_logic.SetMRMLScene(scene)
        segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations_logic.SetMRMLScene(scene)
        slicer.mrmlScene = scene
        slicer.modules = types.SimpleNamespace(
            volumes=types.SimpleNamespace(logic=lambda: volumes_logic),
            segmentations=types.SimpleNamespace(logic=lambda: segmentations_logic),
        )
        # the three standard views, with the orientation presets the app registers
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        for view, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
            node = scene.CreateNodeByClass("vtkMRMLSliceNode")
            node.SetName(view)
            node.SetLayoutName(view)
            node.SetSingletonTag(view)
            assert node.SetOrientation(orientation)
            scene.AddNode(node)
        return scene

    yield types.SimpleNamespace(slicer=slicer, fresh=fresh)
    for name, value in state.items():
        if value is None:
            if hasattr(slicer, name):
                delattr(slicer, name)
        else:
            setattr(slicer, name, value)


# -- a tiny real HTTP server shaped like MONAI Label's error and multipart answers ----------------
class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    routes: dict = {}
    requests_seen: list = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _handle(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.requests_seen.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
        )
        route = self.path.split("?")[0]
        handler = self.routes.get((self.command, route))
        if handler is None:
            status, ctype, payload = 404, "application/json", json.dumps({"detail": "Not Found"})
        else:
            answer = handler(self)
            if answer is None:  # the handler dropped the connection
                return
            status, ctype, payload = answer
        data = payload if isinstance(payload, bytes) else payload.encode()
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _handle


@pytest.fixture
def http_server() -> Iterator:
    """A real http.server on 127.0.0.1; tests register ``routes[(METHOD, path)] = fn``."""
    import types

    handler = type("Handler", (_Handler,), {"routes": {}, "requests_seen": []})

    class QuietServer(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # dropped connections are on purpose
            pass

    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield types.SimpleNamespace(
            url=f"http://127.0.0.1:{server.server_address[1]}",
            routes=handler.routes,
            seen=handler.requests_seen,
        )
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def sample_result() -> dict:
    """A result JSON as docs/api.md pins it: one mask, two boxes, two reasoning steps."""
    from CitrusVLib.rle import encode_rle

    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 15:35] = True
    return {
        "task": "report",
        "prompt": "describe the liver, think step by step",
        "model": {"name": "citrusv-nano", "version": "1"},
        "text": "<think>...</think><answer>Liver normal.</answer>",
        "answer": "The liver is normal in size.",
        "reasoning": [
            {"step": 1, "text": "Find the liver.", "box_ids": ["b1"]},
            {"step": 2, "text": "Compare with the spleen.", "box_ids": ["b1", "b2"]},
        ],
        "boxes": [
            {
                "id": "b1",
                "label": "liver",
                "xyxy": [15.0, 10.0, 35.0, 20.0],
                "slice": 3,
                "score": 0.9,
            },
            {
                "id": "b2",
                "label": "spleen",
                "xyxy": [40.0, 25.0, 55.0, 38.0],
                "slice": 3,
                "score": 0.7,
            },
        ],
        "masks": [
            {
                "label": "liver",
                "label_index": 1,
                "slice": 3,
                "area_px": int(mask.sum()),
                "area_mm2": 123.0,
                "diameters_mm": [18.2, 11.4],
                "score": 0.91,
                "rle": encode_rle(mask),
            }
        ],
        "image": {
            "id": "ct1",
            "shape": [6, 40, 60],
            "spacing": [2.5, 0.82, 0.78],
            "axis": "axial",
            "slices": [3],
        },
        "timing_ms": {"prefill": 1.0, "decode": 2.0, "mask": 3.0, "total": 6.0},
        "warnings": [],
        "label_names": {"liver": 1},
    }


# A second real server whose tiny checkpoint answers detect and report with boxes and a
# reasoning trace (the shared `citrusv_server` answers "Sure, [SEG]." to every task), so the
# Slicer library's box and trace handling is tested against real server output.
REASONING_ANSWERS = {
    "segment": "Sure, [SEG].",
    "detect": '```json [{"bbox_2d": [10, 12, 40, 44], "label": "liver"}] ```',
    "report": "<think>Step 1: the liver <bbox>[10, 12, 40, 44]</bbox> looks normal. "
    "Step 2: the spleen <bbox>[50, 14, 70, 40]</bbox> is small.</think>"
    "<answer>No acute findings.</answer>",
}


@pytest.fixture(scope="session")
def reasoning_model_dir(request, tmp_path_factory):
    """Tiny checkpoint fitted to REASONING_ANSWERS; cached in .pytest_cache by engine code."""
    from tests.server import cached_tiny_checkpoint

    return cached_tiny_checkpoint(request, tmp_path_factory, "citrusv_reasoning_model",
                                  REASONING_ANSWERS)


@pytest.fixture(scope="module")
def citrusv_reasoning_server(tmp_path_factory, reasoning_model_dir, citrusv_sample_studies):
    import shutil

    from tests.server import copy_studies, start_citrusv_server

    root = tmp_path_factory.mktemp("citrusv_reasoning_server")
    studies = copy_studies(root / "studies", citrusv_sample_studies)
    model_dir = root / "model"
    shutil.copytree(reasoning_model_dir, model_dir)
    with start_citrusv_server(studies, model_dir) as server:
        yield server


@pytest.fixture
def citrusv_module(mrml, monkeypatch):
    """CitrusV.py imported on slicer-core. Its Qt layer (``qt``, ``slicer.ScriptedLoadableModule``)
    does not exist outside Slicer and the logic uses none of it: those two get empty stand-ins."""
    import importlib
    import types

    base = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in (
        "ScriptedLoadableModule",
        "ScriptedLoadableModuleWidget",
        "ScriptedLoadableModuleLogic",
        "ScriptedLoadableModuleTest",
    ):
        setattr(base, name, type(name, (), {"__init__": lambda self, *a, **k: None}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", base)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    if not hasattr(mrml.slicer.util, "VTKObservationMixin"):
        monkeypatch.setattr(
            mrml.slicer.util, "VTKObservationMixin", type("M", (), {}), raising=False
        )
    sys.modules.pop("CitrusV", None)
    module = importlib.import_module("CitrusV")
    yield module
    sys.modules.pop("CitrusV", None)
