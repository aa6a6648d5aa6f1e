"""The extension is laid out the way Slicer's build and a Slicer developer expect."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image

EXT = Path(__file__).resolve().parents[2] / "slicer_extension"
MODULE = EXT / "CitrusV"


def test_cmake_lists_every_script_and_resource():
    top = (EXT / "CMakeLists.txt").read_text()
    assert "project(CitrusV)" in top and "add_subdirectory(CitrusV)" in top
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_DEPENDS",
    ):
        assert f"set({key} " in top
    module = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in module
    listed = set(re.findall(r"\$\{MODULE_NAME\}(\S+)", module))
    scripts = {"CitrusV" + s for s in listed}
    on_disk = {str(p.relative_to(MODULE)) for p in MODULE.glob("*.py")} | {
        str(p.relative_to(MODULE)) for p in (MODULE / "CitrusVLib").glob("*.py")
    }
    assert on_disk <= scripts, on_disk - scripts
    assert "Resources/Icons/${MODULE_NAME}.png" in module
    assert "Resources/UI/${MODULE_NAME}.ui" in module
    testing = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for script in re.findall(r"SCRIPT (\S+)\)", testing):
        assert (MODULE / "Testing" / "Python" / script).is_file()
        ast.parse((MODULE / "Testing" / "Python" / script).read_text())


def test_module_classes_and_ui_widgets_match():
    source = (MODULE / "CitrusV.py").read_text()
    tree = ast.parse(source)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"CitrusV", "CitrusVWidget", "CitrusVLogic", "CitrusVTest"} <= classes
    ui = ET.parse(MODULE / "Resources" / "UI" / "CitrusV.ui").getroot()
    root = ui.find("widget")
    assert root.get("class") == "qMRMLWidget" and root.get("name") == "CitrusV"
    names = {w.get("name") for w in ui.iter("widget")}
    used = set(re.findall(r"\.ui\.(\w+)", source))
    assert used, "the widget should use the Designer file"
    assert used <= names, used - names
    for required in (
        "serverComboBox",
        "testConnectionButton",
        "taskComboBox",
        "promptComboBox",
        "scopeComboBox",
        "runButton",
        "reasoningListWidget",
        "closerLookButton",
        "submitCorrectionButton",
        "trainButton",
        "nextSampleButton",
    ):
        assert required in names
    custom = {c.findtext("class") for c in ui.iter("customwidget")}
    assert {
        w.get("class")
        for w in ui.iter("widget")
        if w.get("class").startswith(("q", "ctk")) and not w.get("class").startswith("qt")
    } <= custom | {"QWidget"}


def test_widget_rules_from_the_style_guide():
    source = (MODULE / "CitrusV.py").read_text()
    assert "done.wait(WAIT_STEP_S)" in source and "slicer.app.processEvents()" in source
    assert "def cleanup(self):" in source and "_removeShortcuts()" in source
    assert '"Ctrl+Return"' in source and '("c", self.onCloserLook)' in source
    # the worker function only calls the client / logic worker steps
    assert "threading.Thread(target=work" in source


def test_icon_is_128_png():
    with Image.open(MODULE / "Resources" / "Icons" / "CitrusV.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_the_question_tooltip_names_words_as_the_task_rule_reads_them():
    """The question box's tooltip tells a radiologist which words pick which answer; each
    word it quotes goes to that task by the module's own rule (`guess_task`)."""
    from CitrusVLib.headless import guess_task

    ui = ET.parse(MODULE / "Resources" / "UI" / "CitrusV.ui").getroot()
    box = next(w for w in ui.iter("widget") if w.get("name") == "promptComboBox")
    tip = next(p for p in box.iter("property") if p.get("name") == "toolTip").find("string").text
    kinds = {"a report": "report", "masks": "segment", "boxes": "detect"}
    groups = re.findall(r'((?:"[^"]+", )*"[^"]+") (a report|masks|boxes)', tip)
    assert [kind for _, kind in groups] == ["a report", "masks", "boxes"], tip
    for words, kind in groups:
        for word in re.findall(r'"([^"]+)"', words):
            assert guess_task(f"{word} the liver") == kinds[kind], word
    assert guess_task("Is the liver normal?") == "report"  # "anything else a report"
