"""Static checks of the Slicer extension that need no Slicer application: the module file's classes and imports,
the .ui file against the code, the resources, and the CMake packaging (configured with CMake against a stand-in for
Slicer's CMake package, which only records what the extension asks for)."""

from __future__ import annotations

import ast
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from slicer_support import MODULE_DIR, MODULE_FILE, REPOSITORY, SUPPORTED_SLICERS

import COVIDLesionSegMRML as mrml
from COVIDLesionSegLib.backends import CALIBRATION_FILE
from COVIDLesionSegLib.resources import REGISTRY_FILE_NAME
from COVIDLesionSegLib.segments import ANATOMY_CONTEXT, SEGMENTS, TERMINOLOGY_CONTEXT

RESOURCES = REPOSITORY / "Resources"
UI_FILE = RESOURCES / mrml.UI_FILE
MODULE_SOURCE = MODULE_FILE.read_text(encoding="utf-8")
MODULE_TREE = ast.parse(MODULE_SOURCE)
CLASSES = {node.name: node for node in MODULE_TREE.body if isinstance(node, ast.ClassDef)}


def base_names(class_node: ast.ClassDef) -> list[str]:
    return [base.id if isinstance(base, ast.Name) else ast.unparse(base) for base in class_node.bases]


def ui_widgets() -> dict[str, ElementTree.Element]:
    return {widget.get("name"): widget for widget in ElementTree.parse(UI_FILE).iter("widget")}


def widget_property(widget: ElementTree.Element, name: str):
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def parameter_fields(defaults: bool = False) -> dict[str, str]:
    """``{field: annotation source}`` of the module's parameter node class (``defaults``: ``{field: default source}``)."""
    node = CLASSES["COVIDLesionSegParameterNode"]
    return {item.target.id: ast.unparse(item.value if defaults else item.annotation) for item in node.body
            if isinstance(item, ast.AnnAssign) and (item.value is not None or not defaults)}


def method(class_name: str, name: str) -> ast.FunctionDef:
    return next(item for item in CLASSES[class_name].body if isinstance(item, ast.FunctionDef) and item.name == name)


def test_module_file_defines_module_widget_logic_and_test_classes():
    expected = {
        "COVIDLesionSeg": "ScriptedLoadableModule",
        "COVIDLesionSegWidget": "ScriptedLoadableModuleWidget",
        "COVIDLesionSegLogic": "ScriptedLoadableModuleLogic",
        "COVIDLesionSegTest": "ScriptedLoadableModuleTest",
    }
    for name, base in expected.items():
        assert name in CLASSES, f"{name} is missing"
        assert base in base_names(CLASSES[name])
    decorators = [ast.unparse(decorator) for decorator in CLASSES["COVIDLesionSegParameterNode"].decorator_list]
    assert decorators == ["parameterNodeWrapper"]


def test_self_test_runs_its_test_methods_and_is_not_switched_off():
    test_class = CLASSES["COVIDLesionSegTest"]
    methods = {item.name: item for item in test_class.body if isinstance(item, ast.FunctionDef)}
    calls = [node for node in ast.walk(methods["runTest"]) if isinstance(node, ast.Call)]
    called = {call.func.attr for call in calls if isinstance(call.func, ast.Attribute)}
    test_methods = {name for name in methods if name.startswith("test_")}
    assert test_methods and test_methods <= called
    assert not re.search(r"testLogic\s*=\s*False|unittest\.skip", MODULE_SOURCE)
    assert MODULE_SOURCE.count("skipTest(") == 1  # only when the dependencies are not installed: the test never installs them
    assert "ensureDependencies" not in ast.unparse(test_class)


def test_ui_file_parses_and_has_every_widget_the_code_uses():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_SOURCE))
    assert used, "the widget uses no .ui widgets?"
    assert used <= set(widgets), f"missing in {UI_FILE.name}: {sorted(used - set(widgets))}"
    assert widgets["COVIDLesionSeg"].get("class") == "qMRMLWidget"


WIDGET_CLASSES_FOR_TYPES = {  # what Slicer's parameterNodeWrapper can bind, for the annotations used here
    "bool": {"QCheckBox"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QComboBox", "QLineEdit"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
}


def test_every_bound_widget_matches_a_parameter_of_a_bindable_type():
    fields = parameter_fields()
    bound = {widget_property(widget, "SlicerParameterName").find("string").text: widget
             for widget in ui_widgets().values() if widget_property(widget, "SlicerParameterName") is not None}
    assert set(bound) <= set(fields)
    synced_in_code = {"model", "weightsFile", "statisticsTable"}  # COVIDLesionSegWidget.updateGUI shows these itself
    assert set(bound) | synced_in_code == set(fields)
    for name, widget in bound.items():
        annotation = fields[name]
        if annotation.startswith("vtkMRML"):
            node_types = [item.text for item in widget_property(widget, "nodeTypes").iter("string")]
            assert (widget.get("class"), node_types) == ("qMRMLNodeComboBox", [annotation]), name
            continue
        base_type = re.sub(r"^Annotated\[(\w+), .*\]$", r"\1", annotation)
        assert widget.get("class") in WIDGET_CLASSES_FOR_TYPES[base_type], name
        if widget.get("class") == "QComboBox":
            assert "Choice(" in annotation, f"{name}: a QComboBox binds only to a Choice-annotated value"
        if widget.get("class") in ("QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget"):
            assert "WithinRange(" in annotation, f"{name}: give the spin box its range"


def test_report_and_threshold_parameters_default_to_the_clis_behaviour():
    defaults = parameter_fields(defaults=True)
    assert defaults["visualReport"] == "False"
    assert defaults["highOpacityThreshold"] == "mrml.DEFAULT_HIGH_OPACITY_THRESHOLD_HU"  # equal to statistics' (test_slicer_mrml)
    spin_box = ui_widgets()["highOpacityThresholdSpinBox"]
    assert float(widget_property(spin_box, "value").find("double").text) == mrml.DEFAULT_HIGH_OPACITY_THRESHOLD_HU
    options = ast.unparse(method("COVIDLesionSegLogic", "_cliOptions"))
    assert "report=parameters.visualReport" in options and "high_opacity_threshold_hu=parameters.highOpacityThreshold" in options


def test_every_mrml_widget_receives_the_scene():
    connected = {connection.findtext("receiver") for connection in ElementTree.parse(UI_FILE).iter("connection")
                 if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {name for name, widget in ui_widgets().items() if widget.get("class").startswith("qMRML") and name != "COVIDLesionSeg"}
    assert mrml_widgets and mrml_widgets <= connected


def terminology_codes(entry: str) -> dict:
    """Slicer's terminology entry string → its parts: context~category~type~modifier~anatomic context~region~modifier."""
    parts = entry.split("~")
    assert len(parts) == 7, entry

    def code(text: str) -> tuple[str, str, str] | None:
        scheme, value, meaning = text.split("^")
        return (scheme, value, meaning) if value else None

    return {"context": parts[0], "category": code(parts[1]), "type": code(parts[2]), "modifier": code(parts[3]),
            "anatomic_context": parts[4], "region": code(parts[5])}


def coded(item: dict) -> tuple[str, str, str]:
    return item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"]


def test_terminology_file_has_the_codes_names_and_colours_of_segments_py():
    document = json.loads((RESOURCES / mrml.TERMINOLOGY_FILE).read_text(encoding="utf-8"))
    assert document["SegmentationCategoryTypeContextName"] == TERMINOLOGY_CONTEXT
    categories = {coded(category): category for category in document["SegmentationCodes"]["Category"]}
    for definition in SEGMENTS.values():
        codes = terminology_codes(definition.terminology)
        assert codes["context"] == TERMINOLOGY_CONTEXT
        category = categories[codes["category"]]
        segment_type = {coded(item): item for item in category["Type"]}[codes["type"]]
        described = segment_type
        if codes["modifier"]:
            described = {coded(item): item for item in segment_type["Modifier"]}[codes["modifier"]]
        assert described["3dSlicerLabel"] == definition.name
        assert described["recommendedDisplayRGBValue"] == [round(channel * 255) for channel in definition.color]
        assert category["showAnatomy"] == bool(codes["region"])
        if codes["region"]:
            assert codes["anatomic_context"] == ANATOMY_CONTEXT


def test_model_registry_parses_when_present():
    registry = RESOURCES / REGISTRY_FILE_NAME
    if not registry.is_file():
        pytest.skip(f"{registry} does not exist yet (the core ships it with its first trained model)")
    entries = json.loads(registry.read_text(encoding="utf-8"))["models"]
    assert entries and sum(bool(entry.get("default")) for entry in entries) == 1
    for entry in entries:
        assert entry["name"] and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) and (entry.get("file") or entry.get("url"))
        if entry.get("file"):
            assert (RESOURCES / entry["file"]).is_file()


def test_icon_is_a_128_pixel_png():
    header = (RESOURCES / mrml.ICON_FILE).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


@pytest.fixture(scope="module")
def project() -> dict:
    """The ``[project]`` table of pyproject.toml."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib (Python 3.11+) reads pyproject.toml")
    return tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]


def test_requirements_cover_the_core_but_never_replace_what_slicer_or_the_pytorch_extension_provide(project):
    lines = [line for line in (RESOURCES / mrml.REQUIREMENTS_FILE).read_text().splitlines() if line.strip() and not line.startswith("#")]
    names = {requirement_name(line) for line in lines}
    provided = {"numpy", "simpleitk", "requests", "torch", "torchvision"}
    on_demand = {requirement_name(constant("REPORT_REQUIREMENT"))}  # matplotlib, installed on first use of the visual report
    assert not names & provided and not names & on_demand
    assert {requirement_name(dependency) for dependency in project["dependencies"]} <= names | provided | on_demand
    assert constant("REPORT_REQUIREMENT") in project["dependencies"]
    assert "psutil" in names  # Cancel ends the child process tree with psutil


# The numpy that opencv-python-headless wheels require on Python 3.9 to 3.12 (their Requires-Dist; 4.13.0.92 and 5.0.0.93
# read from the package index with pip, the older ones from their PyPI metadata).
OPENCV_NEEDS_NUMPY = {"4.8.1.78": ">=1.19.3", "4.10.0.84": ">=1.19.3", "4.11.0.86": ">=1.19.3", "4.12.0.88": ">=2,<2.3.0",
                      "4.13.0.92": ">=2", "5.0.0.93": ">=2"}


@pytest.mark.parametrize("slicer_version", SUPPORTED_SLICERS)
def test_requirements_never_need_another_numpy_than_the_one_slicer_ships(slicer_version):
    """Regression: "opencv-python-headless>=4.8" let pip install an opencv that needs numpy >= 2 into Slicer 5.8
    (numpy 1.26.4), replacing the numpy Slicer had loaded."""
    shipped = SUPPORTED_SLICERS[slicer_version]
    environment = {"python_version": ".".join(shipped["python"].split(".")[:2]), "python_full_version": shipped["python"]}
    lines = [line for line in (RESOURCES / mrml.REQUIREMENTS_FILE).read_text().splitlines() if line.strip() and not line.startswith("#")]
    applying = [Requirement(line) for line in lines]
    applying = [requirement for requirement in applying if requirement.marker is None or requirement.marker.evaluate(environment)]
    opencv = [requirement for requirement in applying if requirement.name == "opencv-python-headless"]
    assert len(opencv) == 1 and {requirement.name for requirement in applying} == {requirement_name(line) for line in lines}
    allowed = [version for version in OPENCV_NEEDS_NUMPY if opencv[0].specifier.contains(version)]
    assert allowed, "no opencv version left for this Slicer"
    for version in allowed:
        assert SpecifierSet(OPENCV_NEEDS_NUMPY[version]).contains(shipped["numpy"]), f"opencv {version} replaces numpy {shipped['numpy']}"


def test_recompute_button_measures_the_current_segments_with_the_clis_measure_and_cleans_up():
    assert "self.logic.startMeasure" in ast.unparse(method("COVIDLesionSegWidget", "onRecomputeButton"))
    start = ast.unparse(method("COVIDLesionSegLogic", "startMeasure"))
    assert "mrml.measure_run_command(" in start and "mrml.load_measure_result(" in start  # both tested in test_slicer_measure
    poll = ast.unparse(method("COVIDLesionSegLogic", "_poll"))
    assert poll.index("shutil.rmtree(self._workDir") < poll.index("self._onFinished(outcome)")  # on success, failure and cancel


def test_readme_states_the_supported_slicer_versions_with_their_python_and_numpy():
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Supported Slicer versions"):readme.index("### Install")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines() if re.match(r"\| \d", line)]
    assert {version: dict(zip(("python", "numpy", "SimpleITK"), cells, strict=True)) for version, *cells in rows} == SUPPORTED_SLICERS
    oldest = min(tuple(map(int, shipped["python"].split("."))) for shipped in SUPPORTED_SLICERS.values())
    assert f"stays within Python {oldest[0]}.{oldest[1]}:" in section and f"vermin -t={oldest[0]}.{oldest[1]}-" in section


def test_dependencies_are_installed_after_one_confirmation_without_replacing_slicers_packages():
    ensure = method("COVIDLesionSegLogic", "ensureDependencies")
    calls = {ast.unparse(call.func): call for call in ast.walk(ensure) if isinstance(call, ast.Call)}
    assert [name for name in calls if name.endswith("confirmOkCancelDisplay")] == ["slicer.util.confirmOkCancelDisplay"]
    install_torch = next(call for name, call in calls.items() if name.endswith("installTorch"))
    assert {keyword.arg: ast.unparse(keyword.value) for keyword in install_torch.keywords}["askConfirmation"] == "False"
    assert "mrml.write_constraints" in calls and "-c" in ast.unparse(calls["slicer.util.pip_install"])
    assert "pip_ensure" not in ast.unparse(ensure)  # Slicer 5.12+ only, and it asks on its own


def constant(name: str):
    """A string constant of the module file."""
    return next(node.value.value for node in MODULE_TREE.body if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name)


def test_torch_requirements_match_the_project(project):
    assert f"torch{constant('TORCH_REQUIREMENT')}" in project["dependencies"]
    assert f"torchvision{constant('TORCHVISION_REQUIREMENT')}" in project["dependencies"]


# Stand-ins for the parts of Slicer's Python that exist only inside the application (Qt and the scripted-module base
# classes); everything else (slicer's MRML classes, slicer.util) is the real slicer-core package.
IMPORT_PROBE = textwrap.dedent("""
    import sys, types
    import slicer, vtk
    qt = types.ModuleType("qt")
    qt.QIcon = lambda path: path
    connections = []
    slicer.app = types.SimpleNamespace(connect=lambda signal, slot: connections.append((signal, slot)))
    terminologies = slicer.vtkSlicerTerminologiesModuleLogic()
    slicer.modules = types.SimpleNamespace(terminologies=types.SimpleNamespace(logic=lambda: terminologies))
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    for name in ("ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.WithinRange = lambda *args: args
    sys.modules.update({"qt": qt, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper})

    import COVIDLesionSeg
    module = COVIDLesionSeg.COVIDLesionSeg(types.SimpleNamespace())
    heavy = [name for name in ("torch", "SimpleITK", "COVIDLesionSegLib.checkpoints", "COVIDLesionSegLib.statistics", "psutil")
             if name in sys.modules]
    for signal, slot in connections:
        slot()  # what the application does when it emits the signal
    loaded = vtk.vtkStringArray()
    terminologies.GetLoadedTerminologyNames(loaded)
    print({"heavy": heavy, "title": module.parent.title, "categories": module.parent.categories, "icon": module.parent.icon,
           "signals": [signal for signal, _ in connections],
           "terminologies": [loaded.GetValue(index) for index in range(loaded.GetNumberOfValues())],
           "help": module.parent.helpText, "acknowledgement": module.parent.acknowledgementText,
           "full_help": COVIDLesionSeg.fullHelpText()})  # what the widget's setup makes the help (it imports statistics)
""")


@pytest.fixture(scope="module")
def imported_module() -> dict:
    """Import COVIDLesionSeg.py in a fresh interpreter, as Slicer does at start-up, and report what it loaded."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


def test_importing_the_module_loads_neither_torch_nor_the_heavy_core(imported_module):
    assert imported_module["heavy"] == []


def test_terminology_is_loaded_once_at_application_start_up(imported_module):
    """Regression: it was loaded in the widget's setup with IsTerminologyContextLoaded, which Slicer 5.6/5.8 lack."""
    assert imported_module["signals"] == ["startupCompleted()"]
    assert TERMINOLOGY_CONTEXT in imported_module["terminologies"]
    assert "Terminology" not in ast.unparse(method("COVIDLesionSegWidget", "setup"))


def test_module_icon_is_found_in_source_folder_mode_too(imported_module):
    """Slicer looks for <module folder>/Resources/Icons/<module>.png, which exists only in an installed extension."""
    assert imported_module["icon"] == str(RESOURCES / mrml.ICON_FILE)
    assert not (MODULE_DIR / "Resources").exists()  # this checkout is the source-folder layout


def test_code_that_runs_in_slicer_parses_and_runs_on_python_3_9():
    """Regression: zip(strict=) in models.py and report.py broke every run in Slicer 5.6/5.8 (Python 3.9). vermin finds
    syntax, standard-library calls and keyword arguments newer than the target."""
    pytest.importorskip("vermin", reason="vermin (test extra) checks the minimum Python version")
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable)) or shutil.which("vermin")
    result = subprocess.run([vermin, "-t=3.9-", "--no-tips", "--violations", str(MODULE_DIR)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_module_metadata_cites_the_paper_and_the_dataset(imported_module):
    assert imported_module["categories"] == ["Segmentation"]
    acknowledgement = imported_module["acknowledgement"]
    for citation in ("Ye Duansheng", "Hua Yunsong", "Research on Image Segmentation of Pneumonia Based on Deep",
                     "Hans Publishers, 2022", "10.5281/zenodo.3757476", "10.1002/mp.14676", "Ma J."):
        assert citation in " ".join(acknowledgement.split()), citation


def plain_text(html_text: str) -> str:
    """What a reader sees of an HTML help: tags dropped, entities decoded, white space collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", html_text)).split())


def test_help_text_quotes_every_definition_of_statistics(imported_module):
    from COVIDLesionSegLib.statistics import LEFT_RIGHT_RULE, MEASURES, NOT_AVAILABLE_RULE, SEVERITY_DEFINITIONS

    help_text = plain_text(imported_module["full_help"])
    for measure in MEASURES:
        assert f"{mrml.measure_title(measure.name)} : {measure.definition}" in help_text, measure.name
    for category, meaning in SEVERITY_DEFINITIONS.items():
        assert f"{category}: {meaning}" in help_text, category
    assert LEFT_RIGHT_RULE in help_text and NOT_AVAILABLE_RULE in help_text
    setup = ast.unparse(method("COVIDLesionSegWidget", "setup"))
    assert ".helpText = fullHelpText()" in setup  # the module panel shows the full help


def test_definitions_are_quoted_from_statistics_never_retyped():
    from COVIDLesionSegLib.statistics import LEFT_RIGHT_RULE, MEASURES, NOT_AVAILABLE_RULE, SEVERITY_DEFINITIONS

    sources = {path.name: path.read_text(encoding="utf-8") for path in (MODULE_FILE, MODULE_DIR / "COVIDLesionSegMRML" / "__init__.py")}
    definitions = [measure.definition for measure in MEASURES] + list(SEVERITY_DEFINITIONS.values()) + [LEFT_RIGHT_RULE, NOT_AVAILABLE_RULE]
    for name, source in sources.items():
        flat = " ".join(source.split())
        assert not [definition for definition in definitions if definition in flat], name


STUB_SLICER_CONFIG = """
# Records what the extension asks of Slicer's CMake package; checks files exist as slicerMacroBuildScriptedModule does.
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/record_metadata.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.12/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING ON)
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${file})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file ${file}")
    endif()
  endforeach()
  file(WRITE ${CMAKE_BINARY_DIR}/scripts.txt "${MY_SLICER_SCRIPTS}")
endmacro()
macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT" "" ${ARGN})
  file(WRITE ${CMAKE_BINARY_DIR}/unittests.txt "${MY_SCRIPT}")
endmacro()
"""
RECORD_METADATA = """
file(WRITE ${CMAKE_BINARY_DIR}/metadata.json "{
  \\"homepage\\": \\"${EXTENSION_HOMEPAGE}\\", \\"category\\": \\"${EXTENSION_CATEGORY}\\",
  \\"contributors\\": \\"${EXTENSION_CONTRIBUTORS}\\", \\"description\\": \\"${EXTENSION_DESCRIPTION}\\",
  \\"icon\\": \\"${EXTENSION_ICONURL}\\", \\"screenshots\\": \\"${EXTENSION_SCREENSHOTURLS}\\", \\"depends\\": \\"${EXTENSION_DEPENDS}\\"}")
"""


@pytest.fixture(scope="module")
def cmake_install(tmp_path_factory) -> dict:
    """Configure the extension with CMake against the stand-in Slicer package and install it into a prefix."""
    cmake = shutil.which("cmake")
    if not cmake:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    stub = root / "Slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "empty.cmake").write_text("")
    (stub / "record_metadata.cmake").write_text(RECORD_METADATA)
    build, prefix = root / "build", root / "prefix"
    configure = subprocess.run([cmake, "-S", str(REPOSITORY), "-B", str(build), f"-DSlicer_DIR={stub}"],
                               capture_output=True, text=True, timeout=300)
    if configure.returncode != 0 and "No CMAKE_C_COMPILER could be found" in configure.stderr + configure.stdout:
        pytest.skip("no C/C++ compiler for CMake's project() check")
    assert configure.returncode == 0, configure.stdout + configure.stderr
    install = subprocess.run([cmake, "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True, timeout=120)
    assert install.returncode == 0, install.stdout + install.stderr
    module_dir = "lib/Slicer-5.12/qt-scripted-modules"
    return {"build": build, "build_module_dir": build / module_dir, "installed_module_dir": prefix / module_dir}


def test_cmake_lists_every_python_file_of_the_module(cmake_install):
    listed = (cmake_install["build"] / "scripts.txt").read_text().split(";")
    on_disk = sorted(str(path.relative_to(MODULE_DIR)) for path in MODULE_DIR.rglob("*.py") if "__pycache__" not in path.parts)
    assert sorted(listed) == on_disk
    assert (cmake_install["build"] / "unittests.txt").read_text() == "COVIDLesionSeg.py"


def test_cmake_installs_every_resource_the_module_loads_beside_the_module(cmake_install):
    loaded = [mrml.UI_FILE, mrml.ICON_FILE, mrml.TERMINOLOGY_FILE, mrml.REQUIREMENTS_FILE]
    if (RESOURCES / REGISTRY_FILE_NAME).is_file():
        loaded.append(REGISTRY_FILE_NAME)
        model_files = [entry.file for entry in mrml.registered_models(RESOURCES / REGISTRY_FILE_NAME) if entry.file]
        loaded += model_files + [f"{os.path.dirname(name)}/MODEL_CARD.md" for name in model_files]
    loaded.append(f"Models/{CALIBRATION_FILE}")  # the onnxruntime-int8 backend's calibration slices
    for module_dir in (cmake_install["build_module_dir"], cmake_install["installed_module_dir"]):
        for name in loaded:
            assert (module_dir / "Resources" / name).read_bytes() == (RESOURCES / name).read_bytes(), name


def test_extension_metadata(cmake_install):
    metadata = json.loads((cmake_install["build"] / "metadata.json").read_text())
    assert metadata["category"] == "Segmentation" and metadata["depends"] == "PyTorch"
    assert all(metadata[key] for key in ("homepage", "contributors", "description", "icon", "screenshots"))
    assert metadata["icon"].endswith(mrml.ICON_FILE)
