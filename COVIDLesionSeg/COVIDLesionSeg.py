# ruff: noqa: N815  (parameter node fields are camelCase, like every name Slicer's Python API shows)
"""3D Slicer module: COVID-19 lung lesion segmentation of chest CT (Module, Widget, Logic, Test).

A thin shell over the core package ``COVIDLesionSegLib``. The Logic writes the input volume to a temporary NRRD
file, runs the core CLI (``python -m COVIDLesionSegLib.cli segment``) with Slicer's own Python in a child process
(``COVIDLesionSegLib.child_process``) so that the GUI stays responsive and Cancel ends the whole process tree,
and loads the result and its statistics into the scene (``COVIDLesionSegMRML``). torch is never imported in
Slicer's process, except once by the PyTorch extension when it installs torch.
"""

import collections
import importlib.util
import logging
import pathlib
import shutil
import time
from dataclasses import dataclass
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib import child_process
from COVIDLesionSegLib.segments import LESION, LUNG

TORCH_REQUIREMENT = ">=2.1"
TORCHVISION_REQUIREMENT = ">=0.16"
REPORT_REQUIREMENT = "matplotlib>=3.7"  # installed on first use of the visual report only (the CLI draws it with matplotlib)

HELP_TEXT = f"""
Segments COVID-19 lung lesions (ground-glass opacity and consolidation) in a chest CT volume with a deep network
(the paper's ResAttUnet and its U-Net relatives), slice by slice, and measures the lesion burden.
<ol>
<li>Select the <b>input volume</b> (a chest CT) and, if wanted, an existing <b>segmentation</b>.</li>
<li>Keep the registered <b>model</b> or give a <b>weights file</b> (.safetensors), which also works offline.</li>
<li>Click <b>Apply</b>. Progress and the log stream below; the button turns into <b>Cancel</b>.</li>
<li>The result appears as segment "{LESION.name}" (and "{LUNG.name}" with <i>Compute lung %</i>) in the
segmentation, ready for the Segment Editor, and the measures fill the <b>Statistics</b> table (Export to CSV), with
the same text as summary.csv and the visual report.</li>
</ol>
<b>Visual report</b>: with <i>Visual report</i> on, Apply and Run batch also write a PNG per case (axial slices with
the lesion and lung contours, and the measures table; the first use installs matplotlib, after asking). Its path is in
the table's Report column, and <b>Show report</b> opens the last run's. <i>High-opacity threshold</i> (Advanced):
lesion voxels at or above it count as high opacity. <i>Lesion contrast guard rail</i> (Advanced; CT in Hounsfield
units only): lesion regions less than that many HU denser than the lung within 10 mm around them are dropped, as the
gradual density of dependent lung is (default 75 HU; 0 turns it off, e.g. to check faint ground glass).
<p><b>Batch</b>: segments every file (NIfTI, NRRD, MHA, PNG) and DICOM series of an input folder into
<i>case</i>.seg.nrrd files (and <i>case</i>.report.png) of an output folder and writes summary.csv and summary.json
there, exactly like the <code>covidlesionseg segment</code> command. Cases already done are skipped and keep their
earlier row; a failed case is reported and the batch goes on. An output folder made with another model,
high-opacity threshold or guard rail is refused: choose a new one.</p>
<p><b>Review and export</b>: with <i>Probability map</i> on (Outputs), Apply also loads the lesion probability map and
shows it over the CT, coloured by probability and hidden below the <i>Lesion threshold</i>: lower the threshold to widen
the lesion where ground glass is borderline, raise it to narrow it (0.60, the default, is the lesion the CLI marks
before its other guard rails; 0.50 the network's own decision), then <b>Apply threshold to lesion segment</b> replaces
the lesion segment by what the overlay shows (no guard rail: small components are kept) and <i>Recompute from
segments</i> updates the measures. A <i>.lesion-probability.nrrd</i> written by the CLI can be added with Add Data and chosen as the map.
<b>Export segmentation to DICOM database</b> writes the output segmentation, as edited, as a DICOM Segmentation (SEG)
of its CT into Slicer's DICOM database with Slicer's DICOM SEG plugin (built into Slicer 5.12; the QuantitativeReporting
extension in 5.6 to 5.10), as the DICOM module's export does; the CT must have been loaded from the DICOM database.
Model output is written as AUTOMATIC, edited or re-thresholded segments as SEMIAUTOMATIC. Send it to PACS from the DICOM
module.</p>
"""
# Where the measures' definitions go. They are quoted from COVIDLesionSegLib.statistics by fullHelpText() when the module
# is opened (the module panel reads the help after the widget's setup): importing statistics loads SimpleITK, which
# Slicer's start-up must not wait for.
DEFINITIONS_PENDING = """
<p><b>Statistics</b>: every column is defined in its description (Tables module) and in summary.json; the
definitions are listed here once the module has been opened.</p>
"""
HELP_END = """
<p>Without <i>Compute lung %</i> only the lesion's own measures are shown. For research only; not a medical device.</p>
"""

ACKNOWLEDGEMENT_TEXT = """
The method follows Ye Duansheng, Hua Yunsong, "Research on Image Segmentation of Pneumonia Based on Deep
Learning", Hans Publishers, 2022. Models are trained on the COVID-19-CT-Seg dataset: Ma J. et al., "COVID-19 CT
Lung and Infection Segmentation Dataset", Zenodo, 2020, doi:10.5281/zenodo.3757476; and Ma J. et al., "Toward
data-efficient learning: A benchmark for COVID-19 CT lung and infection segmentation", Medical Physics 48(3),
2021, doi:10.1002/mp.14676. Please cite them when you use this module.
"""


class COVIDLesionSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "COVID-19 Lesion Segmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["COVIDLesionSeg developers"]
        self.parent.helpText = HELP_TEXT + DEFINITIONS_PENDING + HELP_END
        self.parent.acknowledgementText = ACKNOWLEDGEMENT_TEXT
        # Slicer finds <module folder>/Resources/Icons/<module>.png only in an installed extension; in source-folder mode
        # Resources/ is at the repository's top.
        self.parent.icon = qt.QIcon(str(mrml.resource_path(mrml.ICON_FILE)))
        # Once per application, as the reference extensions do: segments of this tool then show their names and colours
        # in every module, also in scenes loaded before this module is opened.
        slicer.app.connect("startupCompleted()", COVIDLesionSegLogic.loadTerminology)


def fullHelpText() -> str:
    """The module's help with the definitions of every measure, the severity categories and the left/right and
    not-available rules, quoted from ``COVIDLesionSegLib.statistics`` (see ``mrml.measures_help_html``)."""
    return HELP_TEXT + mrml.measures_help_html() + HELP_END


@parameterNodeWrapper
class COVIDLesionSegParameterNode:
    """inputVolume: the CT to segment. outputSegmentation: receives the segments (created when None).
    model: registry name; weightsFile: a checkpoint used instead of it. device, batchSize: inference settings.
    computeLung: add the lung segment and % of lung. visualReport: also write each case's report PNG.
    highOpacityThreshold: HU at or above which lesion voxels are high opacity. lesionMinContrast: the contrast guard
    rail, HU (0: off; HU input only). statisticsTable: the last run's
    statistics (and report paths). batchInputFolder, batchOutputFolder: the batch run's folders. probabilityMap: also load
    the lesion probability map of a run. probabilityVolume: the map shown as overlay; probabilityThreshold: the lowest
    lesion probability shown and re-thresholded into the lesion; overlayOpacity: the overlay's opacity."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    model: str
    weightsFile: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu"])] = "auto"
    batchSize: Annotated[int, WithinRange(1, 64)] = 8
    computeLung: bool = True
    visualReport: bool = False
    highOpacityThreshold: Annotated[float, WithinRange(-1024.0, 3071.0)] = mrml.DEFAULT_HIGH_OPACITY_THRESHOLD_HU
    lesionMinContrast: Annotated[float, WithinRange(0.0, 1000.0)] = mrml.DEFAULT_LESION_MIN_CONTRAST_HU
    statisticsTable: vtkMRMLTableNode
    batchInputFolder: pathlib.Path
    batchOutputFolder: pathlib.Path
    probabilityMap: bool = False
    probabilityVolume: vtkMRMLScalarVolumeNode
    probabilityThreshold: Annotated[float, WithinRange(0.01, 1.0)] = mrml.DEFAULT_PROBABILITY_THRESHOLD
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = mrml.DEFAULT_OVERLAY_OPACITY


class COVIDLesionSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._runningKind = None  # "segment", "batch" or "measure" while a child process runs

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(mrml.resource_path(mrml.UI_FILE)))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        slicer.util.getModule(self.moduleName).helpText = fullHelpText()  # read by the module panel after this setup
        self.logic = COVIDLesionSegLogic()

        for entry in mrml.registered_models():
            self.ui.modelComboBox.addItem(entry.name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, entry.description, qt.Qt.ToolTipRole)
        self.ui.modelComboBox.enabled = self.ui.modelComboBox.count > 0

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.modelComboBox.currentTextChanged.connect(self.onModelChanged)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.onWeightsFileChanged)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.batchApplyButton.clicked.connect(self.onBatchApplyButton)
        self.ui.recomputeButton.clicked.connect(self.onRecomputeButton)
        self.ui.exportCsvButton.clicked.connect(self.onExportCsvButton)
        self.ui.showReportButton.clicked.connect(self.onShowReportButton)
        # These handlers take the new value from the signal: they may run before connectGui has put it into the parameter node.
        self.ui.probabilityVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onProbabilityVolumeChanged)
        self.ui.probabilityThresholdSlider.valueChanged.connect(self.onProbabilityThresholdChanged)
        self.ui.overlayOpacitySlider.valueChanged.connect(self.onOverlayOpacityChanged)
        self.ui.applyThresholdButton.clicked.connect(self.onApplyThresholdButton)
        self.ui.exportDicomButton.clicked.connect(self.onExportDicomButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.logic.cancel()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        if not parameterNode.inputVolume:
            parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if not parameterNode.model:
            parameterNode.model = self.logic.defaultModelName()
        self.setParameterNode(parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None) -> None:
        """Model choice, button states and the statistics view follow the parameter node and the running state."""
        parameters = self._parameterNode
        if parameters:
            # Not bound by connectGui: the registry's names are known only at run time, and an unset weights file must
            # show as empty rather than as the "." of an unset pathlib.Path.
            wasBlocked = self.ui.modelComboBox.blockSignals(True)
            self.ui.modelComboBox.setCurrentText(parameters.model)
            self.ui.modelComboBox.blockSignals(wasBlocked)
            weights = mrml.optional_path(parameters.weightsFile)
            if mrml.optional_path(self.ui.weightsPathLineEdit.currentPath) != weights:  # equal paths: keep what is typed
                wasBlocked = self.ui.weightsPathLineEdit.blockSignals(True)
                self.ui.weightsPathLineEdit.currentPath = str(weights or "")
                self.ui.weightsPathLineEdit.blockSignals(wasBlocked)
        canSegment = bool(parameters and parameters.inputVolume and (parameters.model or mrml.optional_path(parameters.weightsFile)))
        canBatch = bool(parameters and mrml.optional_path(parameters.batchInputFolder) and mrml.optional_path(parameters.batchOutputFolder))
        canMeasure = bool(parameters and parameters.inputVolume and parameters.outputSegmentation)
        for kind, button, idleText, ready in (("segment", self.ui.applyButton, "Apply", canSegment),
                                               ("batch", self.ui.batchApplyButton, "Run batch", canBatch),
                                               ("measure", self.ui.recomputeButton, "Recompute from segments", canMeasure)):
            button.text = "Cancel" if self._runningKind == kind else idleText
            button.enabled = self._runningKind == kind or (self._runningKind is None and ready)
        idle = self._runningKind is None
        hasMap = bool(parameters and parameters.probabilityVolume)
        self.ui.probabilityThresholdSlider.enabled = self.ui.overlayOpacitySlider.enabled = hasMap
        self.ui.applyThresholdButton.enabled = idle and hasMap
        self.ui.exportDicomButton.enabled = idle and bool(parameters and parameters.outputSegmentation)
        table = parameters.statisticsTable if parameters else None
        self.ui.statisticsTableView.setMRMLTableNode(table)
        self.ui.exportCsvButton.enabled = bool(table and table.GetNumberOfRows())
        self.ui.showReportButton.enabled = mrml.run_report(table) is not None

    def onModelChanged(self, name: str) -> None:
        if self._parameterNode:
            self._parameterNode.model = name

    def onWeightsFileChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.weightsFile = pathlib.Path(path)

    def onApplyButton(self) -> None:
        self._startOrCancel("segment", self.logic.startSegmentation)

    def onBatchApplyButton(self) -> None:
        self._startOrCancel("batch", self.logic.startBatch)

    def onRecomputeButton(self) -> None:
        self._startOrCancel("measure", self.logic.startMeasure)

    def _startOrCancel(self, kind: str, start) -> None:
        if self._runningKind:
            self.logic.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            self.logic.ensureDependencies(visualReport=self._parameterNode.visualReport)
            start(self._parameterNode, self.onProgress, self.onLog, self.onFinished)
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self._runningKind = kind
            self.updateGUI()

    def onProgress(self, progress) -> None:
        self.ui.progressBar.value = round(progress.percent)
        self.ui.progressBar.setFormat(f"%p%  {progress.message}")

    def onLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def onFinished(self, outcome) -> None:
        self._runningKind = None
        self.onLog(outcome.message)
        if outcome.cancelled:
            self.ui.progressBar.setFormat("%p%  cancelled")
        else:
            self.ui.progressBar.value = 100
            self.ui.progressBar.setFormat("done" if outcome.succeeded else "finished with errors")
        if not outcome.succeeded and not outcome.cancelled:
            slicer.util.errorDisplay(outcome.message)
        self.updateGUI()

    def onExportCsvButton(self) -> None:
        table = self._parameterNode.statisticsTable
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export statistics to CSV",
                                              f"{mrml.safe_file_stem(table.GetName())}.csv", "CSV files (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not export the statistics.", waitCursor=True):
                mrml.write_table_csv(table, path)

    def onProbabilityVolumeChanged(self, node) -> None:
        if self._parameterNode and node:
            self.logic.showProbabilityOverlay(node, self.ui.probabilityThresholdSlider.value, self.ui.overlayOpacitySlider.value,
                                              self._parameterNode.inputVolume)

    def onProbabilityThresholdChanged(self, threshold: float) -> None:
        if self._parameterNode and self._parameterNode.probabilityVolume:
            mrml.set_overlay_threshold(self._parameterNode.probabilityVolume, threshold)

    def onOverlayOpacityChanged(self, opacity: float) -> None:
        if self._parameterNode and self._parameterNode.probabilityVolume:
            self.logic.showProbabilityOverlay(self._parameterNode.probabilityVolume, self.ui.probabilityThresholdSlider.value, opacity,
                                              self._parameterNode.inputVolume)

    def onApplyThresholdButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not apply the threshold to the lesion segment.", waitCursor=True):
            self.onLog(self.logic.applyProbabilityThreshold(self._parameterNode))
        self.updateGUI()

    def onExportDicomButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not export the segmentation to the DICOM database.", waitCursor=True):
            segmentation = self._parameterNode.outputSegmentation
            files = self.logic.exportToDicomDatabase(segmentation)
            message = (f"'{segmentation.GetName()}' was exported as a DICOM SEG ({len(files)} file(s)) into the DICOM database; "
                       "it is in the CT's study in the DICOM module.")
            self.onLog(message)
            slicer.util.infoDisplay(message, windowTitle="Export successful")

    def onShowReportButton(self) -> None:
        """Open the last run's visual report PNG in the system's image viewer."""
        report = mrml.run_report(self._parameterNode.statisticsTable if self._parameterNode else None)
        if report:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(report)))
        self.updateGUI()  # a report deleted meanwhile disables the button


@dataclass(frozen=True)
class RunOutcome:
    succeeded: bool
    message: str
    cancelled: bool = False


class COVIDLesionSegLogic(ScriptedLoadableModuleLogic):
    """Runs the core CLI in a child process and loads its results; usable from scripts without the widget:
    ``startSegmentation(...)`` or ``startBatch(...)``, then ``waitForCompletion()``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._process = None  # the running child_process.ChildProcess
        self._logTail = collections.deque(maxlen=30)  # the last log lines, for the error message of a failed run
        self._onProgress = self._onLog = self._onFinished = self._loadResults = self._workDir = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._poll)

    def getParameterNode(self):
        return COVIDLesionSegParameterNode(super().getParameterNode())

    @property
    def isRunning(self) -> bool:
        return self._process is not None

    @staticmethod
    def defaultModelName() -> str:
        models = mrml.registered_models()
        return next((entry.name for entry in models if entry.default), models[0].name if models else "")

    @staticmethod
    def loadTerminology() -> None:
        """Load the shipped terminology unless it is loaded (at start-up, and before results are shown)."""
        mrml.load_terminology(slicer.modules.terminologies.logic())

    def ensureDependencies(self, askConfirmation: bool = True, visualReport: bool = False) -> None:
        """Install what the CLI needs into Slicer's Python, after one confirmation for all of it: the packages of
        requirements.txt (and matplotlib for the visual report) under a constraints file that keeps Slicer's own numpy,
        SimpleITK and requests, and torch through the PyTorch extension, which picks the CUDA build."""
        requirements = mrml.requirement_lines(mrml.resource_path(mrml.REQUIREMENTS_FILE)) + ([REPORT_REQUIREMENT] if visualReport else [])
        missing = mrml.missing_requirements(requirements)
        needTorch = not (importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision"))
        if not missing and not needTorch:
            return
        if needTorch:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("COVIDLesionSeg needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                   "Manager, restart Slicer, and try again.") from None
        packages = missing + (["torch and torchvision (PyTorch extension)"] if needTorch else [])
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                f"COVID-19 Lesion Segmentation needs these Python packages: {', '.join(packages)}.\n"
                "Download and install them now? This may take a few minutes."):
            raise RuntimeError(f"Required Python packages are not installed: {', '.join(packages)}")
        if missing:
            constraints = mrml.write_constraints(pathlib.Path(slicer.util.tempDirectory("COVIDLesionSeg")) / "constraints.txt")
            slicer.util.pip_install([*missing, "-c", str(constraints)])  # a list of pip arguments in Slicer 5.6 to 5.12
        if needTorch and PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT,
                                                                        torchvisionVersionRequirement=TORCHVISION_REQUIREMENT) is None:
            raise RuntimeError("PyTorch was not installed; the segmentation cannot run without it.")

    def startSegmentation(self, parameters, onProgress, onLog, onFinished) -> None:
        """Segment ``parameters.inputVolume`` in a child process; ``onFinished(RunOutcome)`` follows its end.

        On success the segments are in ``parameters.outputSegmentation`` (created when None) and the statistics in
        ``parameters.statisticsTable`` (likewise); with ``parameters.visualReport`` the report PNG is kept in
        :meth:`reportFolder` and its path is in the table's Report column.
        """
        volume = parameters.inputVolume
        if not volume:
            raise ValueError("Select an input CT volume.")
        workDir = pathlib.Path(slicer.util.tempDirectory("COVIDLesionSeg"))
        options = self._cliOptions(parameters)
        command = mrml.volume_run_command(volume, workDir, options)

        def loadResult() -> str:
            self.loadTerminology()
            segmentation, table, row = mrml.load_volume_result(workDir, volume, parameters.outputSegmentation,
                                                               parameters.statisticsTable, parameters.computeLung,
                                                               report_dir=self.reportFolder(), algorithm_name=options.algorithm_name)
            parameters.outputSegmentation, parameters.statisticsTable = segmentation, table
            report = f" Report: {row['report']}" if row.get("report") else ""
            overlay = ""
            if options.probabilities:
                # The map this volume got from an earlier run is refilled; any other map is left as it is.
                previous = parameters.probabilityVolume
                same = previous if previous and previous.GetName() == f"{volume.GetName()} {mrml.PROBABILITY_NAME_SUFFIX}" else None
                probability = mrml.load_probability_result(workDir, volume, same)
                if probability:
                    parameters.probabilityVolume = probability
                    self.showProbabilityOverlay(probability, parameters.probabilityThreshold, parameters.overlayOpacity, volume)
                    overlay = f" Probability map '{probability.GetName()}' shown over the CT (Review and export)."
            warnings = mrml.warnings_text(row, workDir)
            warning = f" Warning: {warnings}." if warnings else ""
            return f"Done: lesion volume {row['lesion_ml']} mL in {row['lesion_slices']} slices.{warning}{report}{overlay}"

        self._start(command, parameters.device, onProgress, onLog, onFinished, loadResult, workDir)

    def startMeasure(self, parameters, onProgress, onLog, onFinished) -> None:
        """Recompute every measure from the segments of ``parameters.outputSegmentation`` as they are now (e.g. after
        corrections in the Segment Editor) with ``covidlesionseg measure`` in a child process; the volume's row in
        ``parameters.statisticsTable`` then says that it comes from the edited segments."""
        volume, segmentation = parameters.inputVolume, parameters.outputSegmentation
        if not volume or not segmentation:
            raise ValueError("Select the input volume and the segmentation to measure.")
        workDir = pathlib.Path(slicer.util.tempDirectory("COVIDLesionSeg"))
        command = mrml.measure_run_command(volume, segmentation, workDir, pythonSlicerExecutable(), parameters.highOpacityThreshold)

        def loadResult() -> str:
            table, row = mrml.load_measure_result(workDir, volume, segmentation, parameters.statisticsTable, parameters.computeLung)
            parameters.statisticsTable = table
            return (f"Recomputed from the segments of '{segmentation.GetName()}': lesion volume {row['lesion_ml']} mL, "
                    f"% of lung {row['percent_opacity'] or 'n/a'}.")

        self._start(command, "cpu", onProgress, onLog, onFinished, loadResult, workDir)

    def startBatch(self, parameters, onProgress, onLog, onFinished) -> None:
        """Segment every case of ``parameters.batchInputFolder`` into ``parameters.batchOutputFolder`` (cases already
        there are skipped) in a child process; the summary goes to ``parameters.statisticsTable``."""
        outputFolder = mrml.optional_path(parameters.batchOutputFolder)
        command = mrml.folder_run_command(mrml.optional_path(parameters.batchInputFolder), outputFolder, self._cliOptions(parameters))
        startTime = time.time() - 2  # a margin for file systems that store modification times in whole seconds

        def loadResults() -> str:
            table, rows = mrml.load_folder_results(outputFolder, slicer.mrmlScene, parameters.statisticsTable, parameters.computeLung,
                                                   written_after=startTime)
            parameters.statisticsTable = table
            failed = [row for row in rows if row["status"] == "failed"]
            for row in failed:
                self._onLog(f"FAILED {row['input']}: {row['error']}")
            message = f"{mrml.batch_report(rows)} Summary: {outputFolder / mrml.SUMMARY_FILE}"
            if failed:
                raise RuntimeError(f"{message}\nThe log and the statistics table give the error of each failed case.")
            return message

        self._start(command, parameters.device, onProgress, onLog, onFinished, loadResults)

    @staticmethod
    def showProbabilityOverlay(probabilityVolume, threshold: float, opacity: float, ctVolume=None) -> None:
        """Show a lesion probability map over ``ctVolume`` in the slice views, hidden below ``threshold``."""
        mrml.show_probability_overlay(probabilityVolume, threshold, opacity, background_node=ctVolume)

    @staticmethod
    def applyProbabilityThreshold(parameters) -> str:
        """Replace the lesion segment of ``parameters.outputSegmentation`` (created on the map's grid when None) by the voxels
        of ``parameters.probabilityVolume`` at or above ``parameters.probabilityThreshold``; returns what was done, in words."""
        probability = parameters.probabilityVolume
        if not probability:
            raise ValueError("Select a lesion probability map: tick Probability map (Outputs) before Apply, or add a "
                             "*.lesion-probability.nrrd written by the CLI with Add Data.")
        segmentation = parameters.outputSegmentation
        if not segmentation:
            reference = parameters.inputVolume or probability
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference.GetName()} {LESION.name}")
            segmentation.SetAndObserveTransformNodeID(reference.GetTransformNodeID())
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(reference)
            mrml.place_in_study(segmentation, reference)
            parameters.outputSegmentation = segmentation
        voxels = mrml.threshold_probability_into_segment(probability, segmentation, parameters.probabilityThreshold)
        spacing = probability.GetSpacing()
        return (f"Lesion of '{segmentation.GetName()}' re-thresholded at probability {parameters.probabilityThreshold:.2f}: "
                f"{voxels} voxels, {voxels * spacing[0] * spacing[1] * spacing[2] / 1000:.2f} mL. "
                "Recompute from segments updates the measures.")

    @staticmethod
    def exportToDicomDatabase(segmentationNode) -> list:
        """Export ``segmentationNode`` as a DICOM SEG into Slicer's DICOM database as the DICOM module's export dialog does
        (``mrml.export_segmentation_to_dicom_database``): the DICOM SEG plugin writes it into a temporary folder, which is
        imported into the database with copies of its files, then removed. Returns the names of the files imported."""
        if not slicer.dicomDatabase or not slicer.dicomDatabase.isOpen:
            raise RuntimeError("No DICOM database is open: open the DICOM module, load the CT from its database and try again.")
        from DICOMLib import DICOMUtils  # the DICOM module's library; importDicom is the same in Slicer 5.6 to 5.12

        exportDir = pathlib.Path(slicer.app.temporaryPath) / f"DICOMExportTemp_{time.strftime('%Y%m%d_%H%M%S')}"
        try:
            files = mrml.export_segmentation_to_dicom_database(
                segmentationNode, getattr(slicer.modules, "dicomPlugins", {}),
                lambda folder: DICOMUtils.importDicom(folder, copyFiles=True), exportDir)
            return [path.name for path in files]
        finally:
            shutil.rmtree(exportDir, ignore_errors=True)

    @staticmethod
    def reportFolder() -> pathlib.Path:
        """Where the visual reports of scene volumes are kept (Slicer's temporary folder; batch reports stay in the batch's
        output folder)."""
        return pathlib.Path(slicer.app.temporaryPath) / "COVIDLesionSeg reports"

    def cancel(self) -> None:
        """End the running child process and all of its children; the run then finishes as cancelled."""
        if self._process:
            self._process.cancel()

    def waitForCompletion(self, timeout_s: float = 600) -> None:
        """Block (keeping Slicer's events flowing) until the running child process has finished and been handled."""
        deadline = time.monotonic() + timeout_s
        while self.isRunning:
            if time.monotonic() > deadline:
                self.cancel()
                raise TimeoutError(f"the segmentation did not finish within {timeout_s} s and was cancelled")
            slicer.app.processEvents()
            time.sleep(0.05)

    @staticmethod
    def _cliOptions(parameters) -> "mrml.CLIOptions":
        return mrml.CLIOptions(python=pythonSlicerExecutable(), model=parameters.model, weights=mrml.optional_path(parameters.weightsFile),
                               device=parameters.device, batch_size=parameters.batchSize, include_lung=parameters.computeLung,
                               report=parameters.visualReport, high_opacity_threshold_hu=parameters.highOpacityThreshold,
                               lesion_min_contrast_hu=parameters.lesionMinContrast, probabilities=parameters.probabilityMap)

    def _start(self, command, device: str, onProgress, onLog, onFinished, loadResults, workDir=None) -> None:
        """Run ``command``; ``workDir`` (temporary files) is removed when it ends, whether it succeeded, failed or was cancelled."""
        if self.isRunning:
            raise RuntimeError("A segmentation is already running; wait for it or cancel it.")
        self._logTail.clear()

        def log(line: str) -> None:
            self._logTail.append(line)
            onLog(line)

        self._onProgress, self._onLog = onProgress, log
        self._onFinished, self._loadResults, self._workDir = onFinished, loadResults, workDir
        logging.info("COVIDLesionSeg: %s", " ".join(command))
        self._process = child_process.ChildProcess(command, env=child_process.child_environment(device))
        self._timer.start()

    def _poll(self) -> None:
        returncode = self._process.poll(self._onProgress, self._onLog)
        if returncode is None:
            return
        self._timer.stop()
        process, self._process = self._process, None
        if process.cancelled:
            outcome = RunOutcome(False, "Cancelled: the segmentation process and its children were ended.", cancelled=True)
        else:
            try:
                outcome = RunOutcome(True, self._loadResults())
            except FileNotFoundError:  # no summary: the CLI stopped before any case (bad model, bad arguments, …)
                outcome = RunOutcome(False, f"The segmentation process failed (exit code {returncode}):\n" + "\n".join(self._logTail))
            except Exception as error:
                logging.exception("COVIDLesionSeg run failed")
                outcome = RunOutcome(False, str(error))
        if self._workDir:
            shutil.rmtree(self._workDir, ignore_errors=True)
        self._onFinished(outcome)


def pythonSlicerExecutable() -> str:
    """Slicer's own Python interpreter (``PythonSlicer``, on the PATH that Slicer sets up)."""
    python = shutil.which("PythonSlicer")
    if not python:
        raise RuntimeError("PythonSlicer, Slicer's Python interpreter, was not found on the PATH.")
    return python


class COVIDLesionSegTest(ScriptedLoadableModuleTest):
    """Segments a synthetic CT with a tiny CPU model through the same child process as the GUI; shows a probability map as
    overlay and re-thresholds it into the lesion segment."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_ProbabilityOverlayAndThreshold()
        self.setUp()
        self.test_SegmentSyntheticVolume()

    def test_ProbabilityOverlayAndThreshold(self) -> None:
        """In the application: the overlay in the slice views with Slicer's colour table, Apply threshold into a new
        segmentation, and the DICOM export's refusal of a CT that is not from the DICOM database (no torch needed)."""
        import numpy as np

        self.delayDisplay("Showing a probability map over a CT and re-thresholding it")
        ijkToRas = np.diag([-0.8, -0.7, 2.5, 1.0])
        volume = slicer.util.addVolumeFromArray(np.full((6, 20, 16), -800, dtype=np.int16), ijkToRAS=ijkToRas, name="Synthetic chest CT")
        ramp = np.broadcast_to(np.round(np.linspace(0, 255, 16)).astype(np.uint8), (6, 20, 16)).copy()  # p rises along x
        probability = slicer.util.addVolumeFromArray(ramp, ijkToRAS=ijkToRas, name=f"Synthetic chest CT {mrml.PROBABILITY_NAME_SUFFIX}")
        logic = COVIDLesionSegLogic()
        parameters = logic.getParameterNode()
        parameters.inputVolume, parameters.probabilityVolume, parameters.probabilityThreshold = volume, probability, 0.3

        logic.showProbabilityOverlay(probability, 0.3, 0.4, volume)
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(mrml.PROBABILITY_COLOR_NODE_ID))  # this Slicer has the colour table
        self.assertEqual(probability.GetDisplayNode().GetLowerThreshold(), 77)  # floor(0.3 × 255 + 0.5)
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):  # none without a main window
            self.assertEqual((composite.GetForegroundVolumeID(), composite.GetBackgroundVolumeID()), (probability.GetID(), volume.GetID()))
            self.assertAlmostEqual(composite.GetForegroundOpacity(), 0.4)

        logic.applyProbabilityThreshold(parameters)
        lesion = slicer.util.arrayFromSegmentBinaryLabelmap(parameters.outputSegmentation, LESION.channel, volume)
        np.testing.assert_array_equal(lesion, ramp >= 77)
        with self.assertRaisesRegex(ValueError, "not loaded from Slicer's DICOM database"):
            mrml.export_segmentation_to_dicom_database(parameters.outputSegmentation, getattr(slicer.modules, "dicomPlugins", {}),
                                                       lambda folder: False, pathlib.Path(slicer.app.temporaryPath) / "unused")
        self.delayDisplay("Test passed")

    def test_SegmentSyntheticVolume(self) -> None:
        import numpy as np

        missing = mrml.missing_requirements(mrml.requirement_lines(mrml.resource_path(mrml.REQUIREMENTS_FILE)))
        if missing or not importlib.util.find_spec("torch"):  # a test never installs anything
            self.skipTest(f"not installed: {', '.join(missing or ['torch'])}; click Apply once in the module to install them")
        logic = COVIDLesionSegLogic()
        self.delayDisplay("Creating a synthetic chest CT and a tiny model")
        ct = np.full((12, 48, 40), -1000, dtype=np.int16)  # air, [z, y, x]
        ct[:, 6:42, 4:36] = 40  # body
        ct[:, 10:38, 7:18] = ct[:, 10:38, 22:33] = -850  # lungs
        ct[4:8, 20:26, 10:15] = -300  # a ground-glass lesion
        ijkToRas = np.diag([-0.8, -0.7, 2.5, 1.0])
        volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=ijkToRas, name="Synthetic chest CT")

        parameters = logic.getParameterNode()
        parameters.inputVolume = volume
        parameters.weightsFile = self.saveSaturatedTinyCheckpoint(pathlib.Path(slicer.util.tempDirectory("COVIDLesionSegTest")))
        parameters.device = "cpu"
        parameters.batchSize = 4
        parameters.computeLung = True
        outcomes = []
        logic.startSegmentation(parameters, lambda progress: None, logging.info, outcomes.append)
        self.delayDisplay("Segmenting in a child process")
        logic.waitForCompletion(timeout_s=300)
        self.assertTrue(outcomes and outcomes[0].succeeded, outcomes[0].message if outcomes else "no outcome")

        segmentationNode = parameters.outputSegmentation
        segment = segmentationNode.GetSegmentation().GetSegment(LESION.channel)
        self.assertEqual(segment.GetName(), LESION.name)
        terminology = vtk.reference("")
        self.assertTrue(segment.GetTag(segment.GetTerminologyEntryTagName(), terminology))
        self.assertEqual(str(terminology), LESION.terminology)
        self.assertIsNotNone(segmentationNode.GetSegmentation().GetSegment(LUNG.channel))
        self.assertEqual(segmentationNode.GetNodeReferenceID(segmentationNode.GetReferenceImageGeometryReferenceRole()), volume.GetID())
        lesion = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, LESION.channel, volume)
        self.assertEqual(lesion.shape, ct.shape)
        self.assertEqual(int(lesion.sum()), ct.size)  # the saturated model marks every voxel

        table = parameters.statisticsTable
        self.assertEqual(table.GetNumberOfRows(), 1)
        self.assertEqual(table.GetCellText(0, 0), volume.GetName())

        def measure(name: str) -> float:
            return table.GetTable().GetValue(0, table.GetColumnIndex(mrml.measure_title(name))).ToDouble()

        self.assertAlmostEqual(measure("lesion_ml"), ct.size * 0.8 * 0.7 * 2.5 / 1000, delta=0.01)
        self.assertEqual(measure("lesion_slices"), ct.shape[0])
        self.assertAlmostEqual(measure("percent_opacity"), 100.0, delta=0.01)
        self.delayDisplay("Test passed")

    @staticmethod
    def saveSaturatedTinyCheckpoint(folder: pathlib.Path) -> pathlib.Path:
        """A tiny two-channel U-Net whose head outputs +10 everywhere: every voxel becomes lesion and lung, which makes
        the expected statistics exact."""
        import torch

        from COVIDLesionSegLib.checkpoints import Checkpoint, save_checkpoint
        from COVIDLesionSegLib.models import build_model

        kwargs = {"widths": [4, 8, 16, 32, 64], "out_channels": 2}
        stateDict = build_model("unet", **kwargs).state_dict()
        stateDict["head.weight"] = torch.zeros_like(stateDict["head.weight"])
        stateDict["head.bias"] = torch.full_like(stateDict["head.bias"], 10.0)
        return save_checkpoint(Checkpoint("unet", kwargs, stateDict, channels=[LESION.channel, LUNG.channel]), folder / "tiny.safetensors")
