"""Citrus-V: ask a MONAI Label server about the slice in front of you.

The widget wires buttons to CitrusVLib (HTTP, maths, result parsing; no Qt) and CitrusVMRML
(nodes). Server calls run on a worker thread; the UI thread waits with a short
``event.wait`` + ``processEvents`` and never lets the worker touch Qt or MRML.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

import CitrusVMRML
import qt
import slicer
from CitrusVLib import geometry
from CitrusVLib.client import CitrusVClient, image_stamp, infer_params
from CitrusVLib.errors import CitrusVCancelled, CitrusVError, ImageReplacedError
from CitrusVLib.label_io import LabelVolume, upload_id, write_label_volume
from CitrusVLib.result import box_label, step_text
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

SETTINGS_URL = "CitrusV/ServerURL"
SETTINGS_HISTORY = "CitrusV/ServerURLHistory"
SETTINGS_CA = "CitrusV/CACertificate"
DEFAULT_URL = "http://127.0.0.1:8000"
HISTORY_LENGTH = 10
PROGRESS_DELAY_S = 0.8  # show the progress dialog only for calls slower than this
WAIT_STEP_S = 0.03  # UI thread: event.wait step between processEvents
TRAIN_POLL_MS = 5000
PACS_FETCH_TIMEOUT_S = 600  # a server on a PACS fetches a series it has not cached before it answers
# names of the languages /info/ may list as a model's (`CitrusVConfig.languages`, ISO 639-1), as
# the engine names them (`citrusv.parsing.LANGUAGE_NAMES`; tests/app/test_readers_agree.py)
LANGUAGES = {
    "en": "English", "fr": "French", "es": "Spanish", "de": "German", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "ja": "Japanese", "ko": "Korean", "zh": "Chinese",
    "ru": "Russian", "ar": "Arabic", "he": "Hebrew", "el": "Greek", "hi": "Hindi",
    "th": "Thai"}

EXAMPLE_PROMPTS = {
    "Segment": [
        "Segment the liver.",
        "Segment the spleen.",
        "Segment the left kidney.",
        "Segment the lesion.",
    ],
    "Detect": ["Where are the kidneys?", "Locate the aorta.", "Find any nodules in the lungs."],
    "Report": [
        "Write a report for this slice, think step by step.",
        "Describe the liver: shape, size, position.",
        "Is there anything abnormal? Think step by step.",
    ],
}
TASKS = {"Segment": "segment", "Detect": "detect", "Report": "report"}
SCOPES = {"Current slice": "slice", "Slice range": "range", "Whole volume": "volume"}


# ------------------------------------------------------------------------------------------------
class CitrusV(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Citrus-V"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["Citrus-V for 3D Slicer contributors"]
        self.parent.helpText = (
            "Ask a question about the current slice (segment, detect, report). A MONAI Label "
            "server running the Citrus-V app answers with masks, boxes and a reasoning trace. "
            "Correct a mask in the Segment Editor and submit it to fine-tune the model. "
            "Shortcuts: Ctrl+Enter runs the question, <b>c</b> takes a closer look."
        )
        self.parent.acknowledgementText = (
            "Citrus-V (JD Health, 2025) and the CT appearance-reasoning closer look "
            "(Oxford, 2026); "
            "served with MONAI Label."
        )


# ------------------------------------------------------------------------------------------------
SIGNED_OUT = "Not signed in: the sign-in ran out or was ended; sign in again."


class CitrusVWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._busy = False
        self._shortcuts = []
        self._result = None  # last Result shown in the answer panel
        self._resultVolumeID = None
        self._trainTimer = None
        self._trainThread = None
        self._trainStatus = None  # (status,) written by the polling thread, read by the timer

    # -- set-up / tear-down ---------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CitrusV.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CitrusVLogic()

        self._loadServerHistory()
        self.ui.caCertificatePathLineEdit.currentPath = qt.QSettings().value(SETTINGS_CA) or ""
        self._examples = dict(EXAMPLE_PROMPTS)  # the connected server's model's, once known
        self._fillExamplePrompts()

        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.signInButton.connect("clicked(bool)", self.onSignIn)
        self.ui.passwordLineEdit.connect("returnPressed()", self.onSignIn)
        self.ui.caCertificatePathLineEdit.connect(
            "currentPathChanged(QString)",
            lambda path: qt.QSettings().setValue(SETTINGS_CA, path.strip()),
        )
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self._fillExamplePrompts)
        self.ui.scopeComboBox.connect("currentIndexChanged(int)", self._onScopeChanged)
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._onVolumeChanged)
        self.ui.runButton.connect("clicked(bool)", self.onRun)
        self.ui.reasoningListWidget.connect("itemClicked(QListWidgetItem*)", self.onStepClicked)
        self.ui.closerLookButton.connect("clicked(bool)", self.onCloserLook)
        self.ui.editSegmentButton.connect("clicked(bool)", self.onEditSegment)
        self.ui.submitCorrectionButton.connect("clicked(bool)", self.onSubmitCorrection)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(TRAIN_POLL_MS)
        self._trainTimer.connect("timeout()", self._onTrainTimer)
        self._onVolumeChanged(self.ui.volumeSelector.currentNode())

    def enter(self):
        self._installShortcuts()

    def exit(self):
        self._removeShortcuts()

    def cleanup(self):
        self._removeShortcuts()
        self.removeObservers()
        if self._trainTimer is not None:
            self._trainTimer.stop()
        if self.logic is not None:
            self.logic.cleanup()

    def onSceneStartClose(self, caller, event):
        self._result = None
        self._resultVolumeID = None
        self.ui.reasoningListWidget.clear()
        self.ui.answerTextBrowser.clear()
        self.ui.segmentComboBox.clear()
        if self.logic is not None:
            self.logic.forgetUploads()

    def _installShortcuts(self):
        if self._shortcuts:
            return
        mainWindow = slicer.util.mainWindow()
        for keys, callback in (
            ("Ctrl+Return", self.onRun),
            ("Ctrl+Enter", self.onRun),
            ("c", self.onCloserLook),
        ):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", callback)
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self):
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

    # -- settings --------------------------------------------------------------------------------
    def _loadServerHistory(self):
        settings = qt.QSettings()
        history = settings.value(SETTINGS_HISTORY) or []
        if isinstance(history, str):
            history = [history]
        current = settings.value(SETTINGS_URL) or DEFAULT_URL
        self.ui.serverComboBox.clear()
        for url in [current] + [u for u in history if u != current]:
            self.ui.serverComboBox.addItem(url)
        self.ui.serverComboBox.setCurrentIndex(0)

    def _rememberServer(self, url):
        settings = qt.QSettings()
        history = settings.value(SETTINGS_HISTORY) or []
        if isinstance(history, str):
            history = [history]
        history = [url] + [u for u in history if u != url]
        settings.setValue(SETTINGS_HISTORY, history[:HISTORY_LENGTH])
        settings.setValue(SETTINGS_URL, url)
        if self.ui.serverComboBox.findText(url) < 0:
            self.ui.serverComboBox.insertItem(0, url)

    def serverUrl(self):
        return self.ui.serverComboBox.currentText.strip() or DEFAULT_URL

    def client(self):
        token = self.ui.tokenLineEdit.text.strip() or None
        ca = self.ui.caCertificatePathLineEdit.currentPath.strip() or None
        return self.logic.client(self.serverUrl(), token, ca)

    def _fillExamplePrompts(self, *args):
        """Examples for the chosen task; a typed question is kept, an example is swapped."""
        task = self.ui.taskComboBox.currentText
        text = self.ui.promptComboBox.currentText.strip()
        examples = self._examples.get(task, [])
        isExample = any(text in prompts
                        for prompts in (*EXAMPLE_PROMPTS.values(), *self._examples.values()))
        self.ui.promptComboBox.clear()
        for prompt in examples:
            self.ui.promptComboBox.addItem(prompt)
        self.ui.promptComboBox.setEditText(
            examples[0] if (not text or isExample) and examples else text
        )

    # -- state -----------------------------------------------------------------------------------
    def _onVolumeChanged(self, volumeNode):
        if volumeNode is not None and volumeNode.GetImageData() is not None:
            n = max(CitrusVMRML.volume_shape(volumeNode))
            self.ui.rangeFirstSpinBox.setMaximum(n - 1)
            self.ui.rangeLastSpinBox.setMaximum(n - 1)
        self._refreshSegments()
        self._updateButtons()

    def _onScopeChanged(self, *args):
        """Slice range starts as the current slice ± 5, clipped to the volume."""
        volume = self.ui.volumeSelector.currentNode()
        if self.ui.scopeComboBox.currentText == "Slice range" and volume is not None:
            try:
                view = CitrusVMRML.current_slice(volume, self.ui.viewComboBox.currentText)
                n = geometry.slice_count(CitrusVMRML.volume_shape(volume), view.axis)
                self.ui.rangeFirstSpinBox.setMaximum(n - 1)
                self.ui.rangeLastSpinBox.setMaximum(n - 1)
                if self.ui.rangeFirstSpinBox.value == self.ui.rangeLastSpinBox.value:
                    self.ui.rangeFirstSpinBox.value = max(view.slice_index - 5, 0)
                    self.ui.rangeLastSpinBox.value = min(view.slice_index + 5, n - 1)
            except ValueError:
                pass
        self._updateButtons()

    def _updateButtons(self, *args):
        volume = self.ui.volumeSelector.currentNode()
        ready = volume is not None and not self._busy
        hasSegments = self.ui.segmentComboBox.count > 0
        self.ui.runButton.enabled = ready
        self.ui.closerLookButton.enabled = ready and (hasSegments or bool(self._selectedBoxIds()))
        self.ui.editSegmentButton.enabled = ready and hasSegments
        self.ui.submitCorrectionButton.enabled = ready and hasSegments
        self.ui.trainButton.enabled = not self._busy
        self.ui.nextSampleButton.enabled = not self._busy
        self.ui.testConnectionButton.enabled = not self._busy
        self.ui.signInButton.enabled = not self._busy
        isRange = self.ui.scopeComboBox.currentText == "Slice range"
        self.ui.rangeFirstSpinBox.visible = isRange
        self.ui.rangeLastSpinBox.visible = isRange

    def _refreshSegments(self):
        self.ui.segmentComboBox.clear()
        volume = self.ui.volumeSelector.currentNode()
        seg = CitrusVMRML.find_segmentation(volume) if volume is not None else None
        if seg is None:
            return
        segmentation = seg.GetSegmentation()
        for n in range(segmentation.GetNumberOfSegments()):
            segmentId = segmentation.GetNthSegmentID(n)
            self.ui.segmentComboBox.addItem(segmentation.GetSegment(segmentId).GetName(), segmentId)

    def _currentSegmentId(self):
        index = self.ui.segmentComboBox.currentIndex
        return self.ui.segmentComboBox.itemData(index) if index >= 0 else None

    def _selectedBoxIds(self):
        volume = self.ui.volumeSelector.currentNode()
        if volume is None:
            return []
        return [
            n.GetAttribute(CitrusVMRML.BOX_ID_ATTR)
            for n in CitrusVMRML.roi_nodes(volume)
            if n.GetSelected()
        ]

    # -- worker-thread calls ---------------------------------------------------------------------
    def callServer(self, label, function, *args, **kwargs):
        """Run ``function`` on a worker thread; the UI stays live; Cancel abandons the answer.

        The worker only does HTTP and file I/O; its result is returned here on the UI thread.
        """
        done = threading.Event()
        box = {}

        def work():
            try:
                box["value"] = function(*args, **kwargs)
            except BaseException as exc:  # handed to the UI thread below
                box["error"] = exc
            finally:
                done.set()

        thread = threading.Thread(target=work, name="CitrusV-request", daemon=True)
        self._busy = True
        self._updateButtons()
        started = time.monotonic()
        dialog = None
        try:
            thread.start()
            while not done.wait(WAIT_STEP_S):
                slicer.app.processEvents()
                if dialog is None and time.monotonic() - started > PROGRESS_DELAY_S:
                    dialog = slicer.util.createProgressDialog(
                        parent=slicer.util.mainWindow(),
                        windowTitle="Citrus-V",
                        labelText=label,
                        maximum=0,
                    )
                    dialog.setCancelButtonText("Cancel")
                    dialog.show()
                if dialog is not None and dialog.wasCanceled:
                    # the request is closed, so the server stops a question over slices too
                    self.logic.abandonRequests()
                    raise CitrusVCancelled()
        finally:
            if dialog is not None:
                dialog.close()
                dialog.deleteLater()
            self._busy = False
            self._updateButtons()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _report(self, exc, what):
        if isinstance(exc, CitrusVCancelled):
            self.ui.statusLabel.text = "Cancelled."
            return
        if isinstance(exc, (CitrusVError, ValueError)):
            message = str(exc)
        else:
            logging.exception("Citrus-V: %s failed", what)
            message = f"{what} failed: {exc}"
        if (self.ui.serverStatusLabel.text.startswith("Signed in as ")
                and not self.client().signed_in_as):  # the sign-in ended (CitrusVClient.request)
            self.ui.serverStatusLabel.text = SIGNED_OUT
        self.ui.statusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle="Citrus-V")

    # -- buttons ---------------------------------------------------------------------------------
    def onTestConnection(self):
        url = self.serverUrl()
        try:
            info = self.callServer(f"Connecting to {url}...", self.client().info)
        except Exception as exc:
            self.ui.serverStatusLabel.text = str(exc)
            self._report(exc, "Test connection")
            return
        self._rememberServer(url)
        self.ui.serverStatusLabel.text = CitrusVLogic.describeServer(info)
        self._examples = CitrusVLogic.examplePrompts(info)
        self._fillExamplePrompts()

    def onSignIn(self):
        """Sign in with a user name and password (the server asks the department's sign-in
        server); the client keeps the sign-in's refresh token in memory, not the password, and
        gets a new token with it when the token runs out. A pasted access token, if any, is
        left out from then on."""
        user = self.ui.userLineEdit.text.strip()
        password = self.ui.passwordLineEdit.text
        self.ui.tokenLineEdit.text = ""
        client = self.client()
        try:
            self.callServer(f"Signing in to {self.serverUrl()}...", client.sign_in, user,
                            password)
        except Exception as exc:
            self.ui.serverStatusLabel.text = str(exc)
            self._report(exc, "Sign in")
            return
        finally:
            self.ui.passwordLineEdit.text = ""
        self.ui.serverStatusLabel.text = f"Signed in as {client.signed_in_as}."

    def _askContext(self):
        volume = self.ui.volumeSelector.currentNode()
        if volume is None:
            raise CitrusVError("Select a volume first.")
        view = CitrusVMRML.current_slice(volume, self.ui.viewComboBox.currentText)
        if not view.aligned:
            logging.warning(
                "Citrus-V: the %s view is oblique to the volume; sending the nearest %s slice %d.",
                self.ui.viewComboBox.currentText,
                view.axis,
                view.slice_index,
            )
        return volume, view

    def onRun(self):
        if self._busy or self.ui.volumeSelector.currentNode() is None:
            return
        try:
            volume, view = self._askContext()
            task = TASKS[self.ui.taskComboBox.currentText]
            window = self.ui.windowComboBox.currentText
            params = infer_params(
                self.ui.promptComboBox.currentText,
                view.axis,
                SCOPES[self.ui.scopeComboBox.currentText],
                view.slice_index,
                (self.ui.rangeFirstSpinBox.value, self.ui.rangeLastSpinBox.value),
                None if window == "server default" else window,
                is_2d=min(CitrusVMRML.volume_shape(volume)) == 1,
            )
            self._ask(volume, task, params, f"Asking Citrus-V: {params.get('prompt', '')}")
        except Exception as exc:
            self._report(exc, "Run")

    def _ask(self, volume, task, params, label):
        client = self.client()
        upload = self.logic.prepareImage(volume, self.serverUrl())  # UI thread: reads MRML
        try:
            response = self.callServer(label, self.logic.infer, client, upload, task, params)
        except ImageReplacedError as replaced:
            # the volume stands for itself now: uploaded and asked about as its own image
            self.logic.unlinkImage(volume)
            upload = self.logic.prepareImage(volume, self.serverUrl())
            response = self.callServer(label, self.logic.infer, client, upload, task, params)
            response.result.warnings.append(
                f"{replaced} It was uploaded and asked about as its own image.")
        self.logic.rememberImage(volume, self.serverUrl(), upload)
        self._rememberServer(self.serverUrl())
        applied = self.logic.applyResult(response, volume, self._segmentEditorUndo(volume))
        self._showResult(response.result, volume)
        if getattr(applied, "kept", None):
            self.ui.statusLabel.text += (
                f" The closer look marked no {', '.join(applied.kept)}: the earlier mask is kept."
            )
        return applied

    def _segmentEditorUndo(self, volume):
        """The Segment Editor's saveStateForUndo when it edits our segmentation (one undo step)."""
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except Exception:
            return None
        seg = CitrusVMRML.find_segmentation(volume)
        if seg is not None and editor.segmentationNode() == seg:
            return editor.saveStateForUndo
        return None

    def _showResult(self, result, volume):
        self._result = result
        self._resultVolumeID = volume.GetID()
        self.ui.answerTextBrowser.setPlainText(result.shown_text())
        self.ui.reasoningListWidget.clear()
        for step in result.reasoning:
            text = step_text(step.text, step.box_ids)
            ids = f"  [{', '.join(step.box_ids)}]" if step.box_ids and text == step.text else ""
            item = qt.QListWidgetItem(f"{step.step}. {text}{ids}")
            item.setData(qt.Qt.UserRole, step.step)
            self.ui.reasoningListWidget.addItem(item)
        model = result.model or {}
        total = result.timing_ms.get("total")
        parts = [f"{len(result.masks)} mask(s), {len(result.boxes)} box(es)"]
        if model:
            parts.append(f"model {model.get('name', '?')}, version {model.get('version', '?')}")
        if total is not None:
            parts.append(f"{total / 1000:.1f} s")
        self.ui.statusLabel.text = "; ".join(parts) + "."
        self._refreshSegments()
        self._updateButtons()

    def onStepClicked(self, item):
        volume = self.ui.volumeSelector.currentNode()
        if self._result is None or volume is None or volume.GetID() != self._resultVolumeID:
            return
        step = item.data(qt.Qt.UserRole)
        boxIds = [b.id for b in self._result.boxes_for_step(int(step))]
        if CitrusVMRML.select_boxes(volume, boxIds) is None and boxIds:
            self.ui.statusLabel.text = "The boxes of this step were removed from the scene."
        self._updateButtons()

    def onCloserLook(self):
        if self._busy or self.ui.volumeSelector.currentNode() is None:
            return
        try:
            volume, view = self._askContext()
            roi, label = self.logic.closerLookRegion(
                volume, view, self._selectedBoxIds(), self.ui.segmentComboBox.currentText or None
            )
            params = infer_params(
                None,
                view.axis,
                "slice",
                view.slice_index,
                roi=roi,
                label=label,
                is_2d=min(CitrusVMRML.volume_shape(volume)) == 1,
            )
            prompt = self.ui.promptComboBox.currentText.strip()
            if prompt:
                params["prompt"] = prompt
            self._ask(volume, "closer_look", params, f"Closer look at {label or 'the region'}...")
        except Exception as exc:
            self._report(exc, "Closer look")

    def onEditSegment(self):
        volume = self.ui.volumeSelector.currentNode()
        seg = CitrusVMRML.find_segmentation(volume) if volume is not None else None
        if seg is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(seg)
        editor.setSourceVolumeNode(volume)
        segmentId = self._currentSegmentId()
        if segmentId:
            editor.setCurrentSegmentID(segmentId)

    def onSubmitCorrection(self):
        volume = self.ui.volumeSelector.currentNode()
        segmentId = self._currentSegmentId()
        if self._busy or volume is None or not segmentId:
            return
        try:
            client = self.client()
            upload = self.logic.prepareImage(volume, self.serverUrl())
            path, labelInfo = self.logic.exportCorrection(volume, segmentId)
            prompt = self.ui.promptComboBox.currentText.strip() or None
            # without sign-in, the server keeps the Slicer user's name as who sent it (claimed);
            # with a token (pasted, or from signing in) it records the token's user
            signedIn = self.ui.tokenLineEdit.text.strip() or client.signed_in_as
            sender = None if signedIn else self.logic.senderName(
                slicer.app.applicationLogic().GetUserInformation())
            def send(upload):
                return self.callServer(
                    f"Sending the corrected {labelInfo[0]['name']}...",
                    self.logic.submitCorrection,
                    client,
                    upload,
                    path,
                    labelInfo,
                    prompt,
                    sender,
                )

            replaced = ""
            try:
                answer = send(upload)
            except ImageReplacedError as e:
                # drawn on the scan the server had then: it goes with this volume, uploaded
                self.logic.unlinkImage(volume)
                upload = self.logic.prepareImage(volume, self.serverUrl())
                answer = send(upload)
                replaced = f" {e} The correction went with the volume, uploaded as its own image."
            self.logic.rememberImage(volume, self.serverUrl(), upload)
            self.ui.trainStatusLabel.text = (
                f"Correction of {labelInfo[0]['name']} saved on the server "
                f"(label {answer.get('label', '?')}); press Train to learn from it.{replaced}"
            )
        except Exception as exc:
            self._report(exc, "Submit correction")

    def onTrain(self):
        if self._busy:
            return
        try:
            answer = self.callServer("Starting training...", self.client().train)
        except Exception as exc:
            self._report(exc, "Train")
            return
        self.ui.trainStatusLabel.text = f"Training started ({answer.get('id', 'queued')})."
        self._trainTimer.start()

    def _onTrainTimer(self):
        """Poll training status without blocking the UI: a thread fetches, the timer shows."""
        fetched = self._trainStatus
        if fetched is not None:
            self._trainStatus = None
            text, finished = CitrusVLogic.describeTraining(fetched[0])
            self.ui.trainStatusLabel.text = text
            if finished:
                self._trainTimer.stop()
                return
        if self._trainThread is None or not self._trainThread.is_alive():
            client = self.client()

            def poll():
                # only a plain attribute is written here; the timer reads it on the UI thread
                try:
                    self._trainStatus = (client.train_status(),)
                except CitrusVError as exc:
                    self._trainStatus = ({"status": "UNKNOWN", "detail": str(exc)},)

            self._trainThread = threading.Thread(
                target=poll, name="CitrusV-train-status", daemon=True
            )
            self._trainThread.start()

    def onNextSample(self):
        if self._busy:
            return
        try:
            client = self.client()
            sample = self.callServer("Asking for the next sample...", client.next_sample)
            if sample is None:
                self.ui.trainStatusLabel.text = "The server has no unlabelled image left."
                return
            # asked before the download: a scan replaced meanwhile is then seen at the next ask
            info = self.callServer(
                f"Looking up {sample.image_id}...", client.image_info, sample.image_id
            )
            stamp = image_stamp(info)
            volume = self.logic.volumeForImage(sample.image_id, self.serverUrl(), stamp)
            if volume is None:
                tmp = self.logic.tempDirectory()
                path = self.callServer(
                    f"Downloading {sample.image_id}...", client.download_image, sample.image_id, tmp
                )
                volume = slicer.util.loadVolume(path)
                self.logic.rememberImage(volume, self.serverUrl(), sample.image_id, stamp)
            self.ui.volumeSelector.setCurrentNode(volume)
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
            CitrusVMRML.align_views_to_volume(volume)
            if sample.slice_index is not None:
                CitrusVMRML.jump_to_slice(volume, sample.axis, sample.slice_index)
            reason = sample.raw.get("reason", "")
            where = (
                f", {sample.axis} slice {sample.slice_index}"
                if sample.slice_index is not None
                else ""
            )
            self.ui.trainStatusLabel.text = f"Next: {sample.image_id}{where}. {reason}".strip()
        except Exception as exc:
            self._report(exc, "Next sample")


# ------------------------------------------------------------------------------------------------
class CitrusVLogic(ScriptedLoadableModuleLogic):
    """Server session state (clients, uploaded images) and the steps between UI and nodes.

    Methods named ``infer``/``submitCorrection`` run on the worker thread and touch no MRML;
    the others run on the UI thread.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._clients = {}
        self._uploads = {}  # (url, volume id, image mtime) -> datastore image id
        self._tmp = None

    def cleanup(self):
        if self._tmp and os.path.isdir(self._tmp):
            shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp = None

    def tempDirectory(self):
        if self._tmp is None or not os.path.isdir(self._tmp):
            self._tmp = tempfile.mkdtemp(prefix="CitrusV-")
        return self._tmp

    def abandonRequests(self):
        """Close every request in flight (Cancel): the server stops answering them."""
        for client in self._clients.values():
            client.abandon()

    def client(self, url, token=None, caCertificate=None):
        key = (url, token, caCertificate)
        if key not in self._clients:
            self._clients[key] = CitrusVClient(url, token=token, ca_certificate=caCertificate)
        return self._clients[key]

    # -- images on the server --------------------------------------------------------------------
    @staticmethod
    def _uploadKey(volume, url):
        image = volume.GetImageData()
        return (url, volume.GetID(), image.GetMTime() if image is not None else 0)

    def forgetUploads(self):
        self._uploads.clear()

    def prepareImage(self, volume, url):
        """The datastore id to use, or a snapshot to upload once (UI thread: only copies voxels).

        A volume loaded from DICOM also carries its SeriesInstanceUID: a server on the PACS
        has that series, and asking about it by UID sends no voxels and lets corrections go to
        the PACS against the right series (see ``infer``).
        """
        imageId = volume.GetAttribute(CitrusVMRML.IMAGE_ID_ATTR)
        if imageId:
            stamp = volume.GetAttribute(CitrusVMRML.IMAGE_STAT_ATTR)
            return {"image_id": imageId, "image_stat": stamp, "name": volume.GetName()} if stamp \
                else {"image_id": imageId}
        known = self._uploads.get(self._uploadKey(volume, url))
        if known:
            return {"image_id": known}
        path = os.path.join(self.tempDirectory(), f"{volume.GetID()}.nrrd")
        snapshot = CitrusVMRML.volume_snapshot(volume)
        upload = {"path": path, "volume": snapshot,
                  "image_id": upload_id(volume.GetName(), snapshot), "name": volume.GetName()}
        series = CitrusVMRML.dicom_series_uid(volume)
        if series:
            upload["series_uid"] = series
            upload["grid"] = (snapshot.array.shape, snapshot.ijk_to_ras)
        return upload

    def ensureUploaded(self, client, upload):
        """Worker thread: write (NRRD, gzip) and upload the snapshot if the server lacks it. A
        volume downloaded from the server (``rememberImage`` with its image's stamp,
        ``CitrusVClient.image_stamp``) is first checked to be what the server's image still
        holds: ``ImageReplacedError`` if it holds other content since (the widget then unlinks
        the volume and uploads it)."""
        if upload.get("image_stat"):
            now = client.image_stamp(upload["image_id"])
            if now and now != upload["image_stat"]:
                raise ImageReplacedError(upload["image_id"], upload.get("name") or "the volume")
        if "path" in upload and not upload.get("uploaded"):
            if upload.get("volume") is not None:
                write_label_volume(upload["path"], upload.pop("volume"))
            upload["image_id"] = client.upload_image(upload["path"], upload["image_id"])
            upload["uploaded"] = True
        return upload["image_id"]

    def rememberImage(self, volume, url, upload, imageStat=None):
        """Which server image a volume is: ``upload`` a datastore id (the volume was downloaded
        from it; ``imageStat`` its image's stamp just before, ``CitrusVClient.image_stamp``) or what
        ``prepareImage`` gave."""
        imageId = upload if isinstance(upload, str) else upload.get("image_id")
        if isinstance(upload, str) or upload.get("uploaded") or "path" not in upload:
            self._uploads[self._uploadKey(volume, url)] = imageId
        if isinstance(upload, str):
            volume.SetAttribute(CitrusVMRML.IMAGE_ID_ATTR, imageId)
            if imageStat:
                volume.SetAttribute(CitrusVMRML.IMAGE_STAT_ATTR, imageStat)

    def unlinkImage(self, volume):
        """The volume is no longer the server's image it was downloaded from (replaced there):
        the next question or correction uploads it as its own image."""
        volume.RemoveAttribute(CitrusVMRML.IMAGE_ID_ATTR)
        volume.RemoveAttribute(CitrusVMRML.IMAGE_STAT_ATTR)
        for key in [k for k in self._uploads if k[1] == volume.GetID()]:
            del self._uploads[key]

    def volumeForImage(self, imageId, url, imageStat=None):
        """The volume downloaded for a datastore id, if the server's image is still what it was
        then (``imageStat``: its image's stamp now); one whose image holds other content is
        unlinked (``unlinkImage``), and None is returned: download it again."""
        for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if volume.GetAttribute(CitrusVMRML.IMAGE_ID_ATTR) != imageId:
                continue
            then = volume.GetAttribute(CitrusVMRML.IMAGE_STAT_ATTR)
            if imageStat and then and then != imageStat:
                self.unlinkImage(volume)
                continue
            return volume
        return None

    # -- worker-thread steps -----------------------------------------------------------------------
    def infer(self, client, upload, task, params):
        """Ask about the image. A DICOM volume is asked about by its SeriesInstanceUID first
        when the server has that series; its answer is kept only if the server read the series
        onto the same voxel grid as Slicer did (``image.ijk_to_ras``), since slice numbers and
        mask rows mean voxels. Otherwise the volume is uploaded and asked about, with a warning.
        """
        warning = None
        series = upload.pop("series_uid", None)
        if series and not upload.get("uploaded"):
            try:
                on_server = client.image_exists(series, read_timeout=PACS_FETCH_TIMEOUT_S)
            except CitrusVError as e:
                on_server, warning = False, (
                    f"The server could not look up DICOM series {series} ({e}); "
                    f"'{upload.get('name')}' was uploaded instead.")
            response = None
            if on_server:
                try:
                    response = client.infer(task, series, params)
                except CitrusVError as e:
                    # the server cannot read the series as one image (two radiographs in one
                    # series): its 400 names the series; a 400 about the question does not
                    if e.status != 400 or series not in (e.detail or ""):
                        raise
                    warning = (f"The server could not read DICOM series {series} as one image "
                               f"({str(e).rstrip('.')}); '{upload.get('name')}' was uploaded "
                               "and asked about instead.")
            if response is not None:
                shape, ijk_to_ras = upload["grid"]
                image = response.result.image
                if image.ijk_to_ras is not None and geometry.same_voxel_grid(
                        image.shape, image.ijk_to_ras, shape, ijk_to_ras):
                    upload.update(image_id=series, uploaded=True)
                    upload.pop("volume", None)
                    return response
                warning = (f"The server's copy of DICOM series {series} is not on the voxel grid "
                           f"of '{upload.get('name')}' in Slicer, so its answer was not used; "
                           "the volume was uploaded and asked about instead.")
        imageId = self.ensureUploaded(client, upload)
        response = client.infer(task, imageId, params)
        if warning:
            response.result.warnings.append(warning)
        return response

    def submitCorrection(self, client, upload, path, labelInfo, prompt, sender=None):
        """Send a correction as training data. Against a DICOM series only once an answer has
        shown the server's copy to be on the same grid (``infer``); else the volume is uploaded.
        ``sender`` (``senderName``) is who sends it, for a server without sign-in: it keeps the
        name as claimed, not checked; a server with sign-in records the token's user instead."""
        upload.pop("series_uid", None)
        imageId = self.ensureUploaded(client, upload)
        params = {"claimed_by": sender} if sender else None
        return client.put_label(imageId, path, labelInfo, prompt=prompt, tag="final", params=params)

    @staticmethod
    def senderName(userInformation):
        """The name in Slicer's Application Settings > User (a ``vtkPersonInformation``), else
        its login, else None; as the server takes it (printable characters, at most 128), so an
        odd name never stops a correction."""
        if userInformation is None:
            return None
        for value in (userInformation.GetName(), userInformation.GetLogin()):
            value = " ".join((value or "").split())  # no line breaks or tabs
            value = "".join(c for c in value if c.isprintable()).strip()[:128].strip()
            if value:
                return value
        return None

    # -- UI-thread steps ---------------------------------------------------------------------------
    def applyResult(self, response, volume, saveStateForUndo=None):
        labelVolume = None
        result = response.result
        if response.label_bytes and not all(m.rle is not None for m in result.masks):
            labelVolume = self._readLabel(response, volume)
        return CitrusVMRML.apply_result(
            result, volume, label_volume=labelVolume, save_state_for_undo=saveStateForUndo
        )

    def _readLabel(self, response, volume):
        """The label file as [k, j, i] + geometry: nibabel if present, else Slicer's reader."""
        try:
            return response.label_volume()
        except ValueError:
            path = response.save_label(self.tempDirectory())
            node = slicer.util.loadLabelVolume(path, {"show": False})
            try:
                return LabelVolume(
                    slicer.util.arrayFromVolume(node).copy(),
                    CitrusVMRML.ijk_to_ras(node, world=False),
                )
            finally:
                slicer.mrmlScene.RemoveNode(node)

    def closerLookRegion(self, volume, view, selectedBoxIds, segmentName):
        """Square slice-pixel ROI around the selected box, else around the segment on this slice
        (a list of squares, one per main part, where the segment has parts apart)."""
        shape = CitrusVMRML.volume_shape(volume)
        h, w = geometry.slice_shape(shape, view.axis)
        m = CitrusVMRML.ijk_to_ras(volume)
        if selectedBoxIds:
            for node in CitrusVMRML.roi_nodes(volume):
                if node.GetAttribute(CitrusVMRML.BOX_ID_ATTR) == selectedBoxIds[0]:
                    box, _ = geometry.roi_to_box(m, view.axis, CitrusVMRML.roi_of_node(node))
                    label = (node.GetAttribute(CitrusVMRML.BOX_LABEL_ATTR)
                             or box_label(node.GetName()))
                    return geometry.closer_look_roi(box, (h, w)), label
        seg = CitrusVMRML.find_segmentation(volume)
        if seg is None or not segmentName:
            raise CitrusVError(
                "Select a box (click a reasoning step) or a segment for a closer look."
            )
        segmentId = seg.GetSegmentation().GetSegmentIdBySegmentName(segmentName)
        mask = CitrusVMRML.segment_array(seg, segmentId, volume) > 0
        plane = geometry.get_slice(mask, view.axis, view.slice_index)
        if not plane.any():
            raise CitrusVError(
                f"'{segmentName}' is empty on this slice: nothing to look at closer."
            )
        squares = geometry.closer_look_rois(plane, (h, w))
        return (squares[0] if len(squares) == 1 else squares), segmentName

    def exportCorrection(self, volume, segmentId):
        seg = CitrusVMRML.find_segmentation(volume)
        if seg is None:
            raise CitrusVError("There is no Citrus-V segmentation for this volume to submit.")
        return CitrusVMRML.export_segment_label(seg, segmentId, volume, self.tempDirectory())

    @staticmethod
    def examplePrompts(info):
        """Example questions per task choice: the served model's own (`examples` of each
        citrusv_<task> in /info/; a small model such as nano knows only its training
        phrasings) where it names some, else the module's general ones."""
        models = (info or {}).get("models", {}) or {}
        out = {}
        for choice, task in TASKS.items():
            named = (models.get(f"citrusv_{task}") or {}).get("examples") or []
            named = [q for q in named if isinstance(q, str) and q.strip()]
            out[choice] = named or list(EXAMPLE_PROMPTS[choice])
        return out

    @staticmethod
    def describeServer(info):
        """One line for /info/: app, Citrus-V tasks, serving model version or why none, its
        intended use, what it was taught to find and the languages of its questions, where
        the model folder says."""
        models = info.get("models", {}) or {}
        names = [m for m in models if m.startswith("citrusv_")]
        citrus = info.get("citrusv", {}) or {}
        text = f"Connected: {info.get('name', 'MONAI Label')} with {len(names)} Citrus-V task(s)"
        version = citrus.get("serving_version")
        status = citrus.get("status")
        if version is not None:
            text += f"; serving model version {version}"
        if status and status not in ("ready", "loaded", "ok"):
            text += f"; model {status}"
        text += "."
        if citrus.get("intended_use"):  # the model folder's own words (intended_use.txt)
            text += f" Intended use: {citrus['intended_use']}"
        taught = [str(s) for s in citrus.get("structures") or [] if str(s).strip()]
        if taught:  # what the model was taught to find (config.json); none listed: the 8B
            text += f" It was taught to find only: {', '.join(taught)}."
        spoken = [LANGUAGES.get(str(x), str(x)) for x in citrus.get("languages") or []
                  if str(x).strip()]
        if spoken:  # the languages of the questions it was taught (config.json)
            text += f" Ask in {' or '.join(spoken)}: it was taught questions in no other language."
        return text

    @staticmethod
    def describeTraining(status):
        """(text, finished) for a /train/ answer."""
        if status is None:
            return "No training has run yet.", True
        if isinstance(status, list):
            status = status[-1] if status else {}
        state = str(status.get("status", "UNKNOWN")).upper()
        details = status.get("details") or status.get("detail") or ""
        if isinstance(details, (list, tuple)):
            details = details[-1] if details else ""
        finished = state in ("DONE", "ERROR", "STOPPED", "UNKNOWN")
        text = f"Training: {state.lower()}"
        last = str(details).strip().splitlines()[-1][:200] if str(details).strip() else ""
        if last:
            text += f" ({last})"
        return text + ".", finished


# ------------------------------------------------------------------------------------------------
class CitrusVTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: drives the widget against the server in CITRUSV_SERVER_URL.

    Start the server (README), start Slicer with CITRUSV_SERVER_URL set, open the module with
    developer mode on and press "Reload and Test". It loads the server's next sample, asks
    segment / detect / report / closer look, and submits the segment as a correction.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        url = os.environ.get("CITRUSV_SERVER_URL")
        if not url:
            self.delayDisplay("CITRUSV_SERVER_URL is not set: skipping the Citrus-V server test.")
            return
        self.test_ask_correct_and_train(url)

    def test_ask_correct_and_train(self, url):
        self.delayDisplay(f"Citrus-V against {url}")
        slicer.util.selectModule("CitrusV")
        widget = slicer.modules.citrusv.widgetRepresentation().self()
        widget.ui.serverComboBox.setEditText(url)

        widget.onTestConnection()
        self.assertTrue(
            widget.ui.serverStatusLabel.text.startswith("Connected"),
            widget.ui.serverStatusLabel.text,
        )

        widget.onNextSample()
        volume = widget.ui.volumeSelector.currentNode()
        self.assertIsNotNone(volume)
        view = CitrusVMRML.current_slice(volume, "Red")

        # segment the current slice: a segment named after the structure, on that slice only
        widget.ui.taskComboBox.setCurrentText("Segment")
        widget.ui.promptComboBox.setEditText("Segment the liver.")
        widget.ui.scopeComboBox.setCurrentText("Current slice")
        widget.onRun()
        seg = CitrusVMRML.find_segmentation(volume)
        self.assertIsNotNone(seg)
        self.assertGreater(seg.GetSegmentation().GetNumberOfSegments(), 0)
        segmentId = seg.GetSegmentation().GetNthSegmentID(0)
        mask = CitrusVMRML.segment_array(seg, segmentId, volume)
        axisIndex = geometry.AXES.index(view.axis)
        onSlices = set(map(int, mask.nonzero()[axisIndex]))
        self.assertTrue(onSlices <= {view.slice_index}, onSlices)

        # detect: ROI nodes named "b1 <label>", locked
        widget.ui.taskComboBox.setCurrentText("Detect")
        widget.ui.promptComboBox.setEditText("Where is the liver?")
        widget.onRun()
        rois = CitrusVMRML.roi_nodes(volume)
        for node in rois:
            self.assertRegex(node.GetName(), r"^b\d+ ")
            self.assertTrue(node.GetLocked())

        # report: the reasoning steps are listed and clicking one selects its boxes
        widget.ui.taskComboBox.setCurrentText("Report")
        widget.ui.promptComboBox.setEditText("Write a report for this slice, think step by step.")
        widget.onRun()
        if widget.ui.reasoningListWidget.count:
            widget.onStepClicked(widget.ui.reasoningListWidget.item(0))

        # closer look on the segment, then submit it as a correction
        widget.ui.segmentComboBox.setCurrentIndex(0)
        if mask.any():
            widget.onCloserLook()
        widget.onSubmitCorrection()
        self.assertIn("saved on the server", widget.ui.trainStatusLabel.text)
        self.delayDisplay("Citrus-V test passed")
