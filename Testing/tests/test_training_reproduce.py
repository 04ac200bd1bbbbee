"""covidlesionseg-reproduce end to end on real slices with tiny overrides: results, figures, reruns, the command line."""

from __future__ import annotations

import json

import pytest

from COVIDLesionSegTraining import reproduce as reproduce_module
from COVIDLesionSegTraining.data import SliceRecord
from COVIDLesionSegTraining.reproduce import PAPER_TABLE3, PROFILES, figure_slices, main, model_config, reproduce
from COVIDLesionSegTraining.splits import SplitSpec

TINY = {"max_steps": 2, "image_size": 64, "model_widths": (4, 8, 16, 32, 64)}  # widths: the plain-encoder models only
FIGURES = ("fig5_training_loss.png", "fig6_validation_loss.png", "fig7_predictions.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def paper_reproduction(shared_data, tmp_path_factory):
    """The four models on the paper's split, 2 steps each at 64²: ``(folder, results)``."""
    folder = tmp_path_factory.mktemp("reproduce")
    results = reproduce(
        shared_data, folder / "results", folder / "runs", SplitSpec("paper"), PROFILES["cpu"], overrides=TINY, device="cpu", command="test"
    )
    return folder, results


def table_rows(markdown: str, source: str) -> dict[str, list[str]]:
    """``{method: [Acc, Pc, Sen, Sp, F1]}`` of the Table 3 rows whose source column is ``source``."""
    rows = {}
    for line in markdown.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[1] == source:
            rows[cells[0]] = cells[2:]
    return rows


def formatted(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def test_profiles_are_the_papers_protocol_and_the_cut_down_one(tmp_path):
    split = SplitSpec("paper")
    assert model_config("resattunet", PROFILES["paper"], "d", tmp_path, split, {}).differences_from_paper() == []
    cpu = [model_config(model, PROFILES["cpu"], "d", tmp_path, split, {}) for model in PAPER_TABLE3]
    assert {(config.image_size, config.max_steps, config.batch_size, config.encoder_weights) for config in cpu} == {(128, 600, 2, "none")}
    assert [config.output_dir for config in cpu] == [str(tmp_path / model) for model in PAPER_TABLE3]


def test_writes_results_figures_and_the_papers_numbers(paper_reproduction):
    folder, results = paper_reproduction
    output = folder / "results"
    for name in FIGURES:
        assert (output / name).read_bytes()[:8] == PNG_SIGNATURE, name
    assert json.loads((output / "results.json").read_text()) == results
    assert list(results["models"]) == ["unet", "resunet", "attunet", "resattunet"]
    assert {model: result["training"]["steps"] for model, result in results["models"].items()} == dict.fromkeys(PAPER_TABLE3, 2)
    assert all(result["test"]["slices"] == 10 for result in results["models"].values())
    assert len(results["figure7"]) == 4 and len({item["volume_id"] for item in results["figure7"]}) == 4
    markdown = (output / "results.md").read_text()
    assert "command: `test`" in markdown and "From-scratch encoders" in markdown
    assert "**Cut-down schedule.** The models trained for 2 optimizer steps (0.0198 epochs) at 64²" in markdown
    assert "**warning:** the 'paper' split is drawn by slice" in markdown
    assert "image_size: 64 (paper: 256)" in markdown and "max_steps: 2" in markdown
    assert "Patient level" not in markdown  # the paper split has no patient-level table


def test_markdown_numbers_are_the_json_numbers(paper_reproduction):
    folder, results = paper_reproduction
    markdown = (folder / "results" / "results.md").read_text()
    metrics = ("Acc", "Pc", "Sen", "Sp", "F1")
    names = {"unet": "Unet", "resunet": "Res-Unet", "attunet": "Attention-Unet", "resattunet": "ResAttUnet"}
    expected = {
        "paper": {names[m]: [formatted(PAPER_TABLE3[m][k]) for k in metrics] for m in names},
        "ours, pooled": {names[m]: [formatted(r["test"]["pooled"][k]) for k in metrics] for m, r in results["models"].items()},
        "ours, per-slice mean": {
            names[m]: [formatted(r["test"]["per_slice_mean"][k]["mean"]) for k in metrics] for m, r in results["models"].items()
        },
    }
    for source, rows in expected.items():
        assert table_rows(markdown, source) == rows, source
    baseline = results["all_background_baseline"]
    assert f"Acc {formatted(baseline['Acc'])} and Sp {formatted(baseline['Sp'])}" in markdown


def test_rerun_skips_finished_runs_resumes_longer_ones_and_refuses_other_settings(paper_reproduction, monkeypatch):
    folder, results = paper_reproduction
    runs, split = folder / "runs", SplitSpec("paper")
    logs = {model: (runs / model / "log.csv").read_text() for model in PAPER_TABLE3}
    with monkeypatch.context() as patch:
        patch.setattr(reproduce_module, "train", lambda *args, **kwargs: pytest.fail("a finished run was trained again"))
        again = reproduce(results["data_dir"], folder / "again", runs, split, PROFILES["cpu"], overrides=TINY, device="cpu")
    assert {model: (runs / model / "log.csv").read_text() for model in PAPER_TABLE3} == logs
    assert {m: r["test"]["pooled"] for m, r in again["models"].items()} == {m: r["test"]["pooled"] for m, r in results["models"].items()}

    longer = reproduce(results["data_dir"], folder / "longer", runs, split, PROFILES["cpu"], ["unet"], {**TINY, "max_steps": 3}, "cpu")
    assert [row["step"] for row in longer["models"]["unet"]["training"]["log"]] == [2, 3]
    with pytest.raises(ValueError, match="choose another --runs"):
        reproduce(results["data_dir"], folder / "other", runs, split, PROFILES["cpu"], ["unet"], {**TINY, "image_size": 32}, "cpu")


def test_command_line_on_a_patient_level_split(tiny_data, tmp_path):
    arguments = ["--data", str(tiny_data), "--output", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]
    arguments += ["--split", "holdout", "--holdout-groups", "radiopaedia_7_85703_0", "--profile", "cpu", "--models", "resattunet"]
    arguments += ["--max-steps", "1", "--image-size", "64", "--device", "cpu"]
    assert main(arguments) == 0
    markdown = (tmp_path / "results" / "results.md").read_text()
    assert "command: `covidlesionseg-reproduce --data " in markdown and "--holdout-groups radiopaedia_7_85703_0" in markdown
    assert "## Patient level: Dice per test volume" in markdown and "| radiopaedia_7_85703_0 | 3 |" in markdown
    assert "no warnings for this split" in markdown
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    assert list(results["models"]) == ["resattunet"] and results["models"]["resattunet"]["training"]["steps"] == 1
    assert all((tmp_path / "results" / name).is_file() for name in FIGURES)


def records(volumes: int, slices: int) -> list[SliceRecord]:
    return [SliceRecord(f"v{volume}", f"v{volume}", position, None, None, None) for volume in range(volumes) for position in range(slices)]


def test_figure7_prefers_the_middle_slices_of_evenly_spaced_volumes():
    chosen = figure_slices(records(10, 5), 4)
    assert [(record.volume_id, record.position) for record in chosen] == [("v0", 2), ("v3", 2), ("v6", 2), ("v9", 2)]
    chosen = figure_slices(records(2, 5), 4)  # fewer volumes than rows: the rest evenly spaced over the other slices
    assert [(record.volume_id, record.position) for record in chosen] == [("v0", 0), ("v0", 2), ("v1", 2), ("v1", 4)]
    assert figure_slices(records(1, 2), 4) == records(1, 2)
