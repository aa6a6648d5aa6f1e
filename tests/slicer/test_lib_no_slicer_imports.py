"""CitrusVLib must run outside Slicer: it never imports slicer, qt, ctk or vtk."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[2] / "slicer_extension" / "CitrusV" / "CitrusVLib"
FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "vtkmodules", "PythonQt"}


def test_no_forbidden_import_statements():
    offenders = []
    for path in sorted(LIB.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert not offenders
    assert len(list(LIB.glob("*.py"))) >= 10


def test_every_module_imports_with_slicer_blocked():
    modules = sorted(p.stem for p in LIB.glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        f"for name in {sorted(FORBIDDEN)!r}: sys.modules[name] = None\n"
        "import importlib\n"
        f"for m in {modules!r}: importlib.import_module('CitrusVLib.' + m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r} "
        "and sys.modules[m] is not None]\n"
        "assert not bad, bad\n"
        "print('ok', len(sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=LIB.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
