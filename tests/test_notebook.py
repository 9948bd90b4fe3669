"""A chapter never starts a long run by itself: it shows committed results, or says what is
missing, what it cost when measured, and the command that makes it."""

import re
import shutil
from pathlib import Path

import pytest

from rmlib.notebook import NeedsRun, open_chapter

COMMITTED = Path(__file__).resolve().parents[1] / "data" / "results" / "cifar100" / "cpu"


@pytest.fixture
def committed_cpu(tmp_path):
    """This test's results folder holding the committed cpu-profile results."""
    if not (COMMITTED / "table1.json").exists():
        pytest.skip("no committed cpu-profile results")
    folder = tmp_path / "results" / "cifar100" / "cpu"
    folder.mkdir(parents=True)
    for name in ("table1", "ablation", "backbones"):
        shutil.copy(COMMITTED / f"{name}.json", folder)
    return folder


def test_a_missing_costly_profile_shows_the_committed_cpu_results_and_the_command(
        committed_cpu, capsys):
    chapter = open_chapter("cifar100", "paper")
    assert chapter.config.name == "cpu" and "RM" in chapter.table
    printed = capsys.readouterr().out
    assert "No `paper` results yet" in printed
    assert "python -m rmlib reproduce cifar100 --profile paper" in printed
    assert "Profile `cpu`" in printed  # and where the shown numbers come from


def test_with_no_results_at_all_a_chapter_says_what_to_run():
    with pytest.raises(NeedsRun, match=r"no cpu-profile results .*reproduce cifar100 "
                                       r"--profile cpu"):
        open_chapter("cifar100", "cpu")


def test_missing_backbones_are_named_with_their_measured_time_not_trained(
        committed_cpu, cifar_root, monkeypatch, tmp_path):
    monkeypatch.setenv("RMLIB_DATA", str(cifar_root))
    chapter = open_chapter("cifar100", "cpu")
    with pytest.raises(NeedsRun) as raised:
        chapter.experiment()
    message = str(raised.value)
    assert "backbone old, backbone new" in message and "\n" not in message
    assert "train cifar100 both --profile cpu" in message
    assert re.search(r"making them took \d+ min on \S", message)  # measured, from the file
    assert not (tmp_path / "runs" / "cifar100" / "cpu").exists()  # nothing was started


def test_missing_transforms_ask_for_the_whole_reproduce_run(
        committed_cpu, cifar_root, monkeypatch):
    monkeypatch.setenv("RMLIB_DATA", str(cifar_root))
    chapter = open_chapter("cifar100", "cpu")
    with pytest.raises(NeedsRun, match="transform mcl-rho.*reproduce"):
        chapter.experiment(transforms=("mcl-rho",))


def test_a_chapters_experiment_fits_with_the_settings_its_results_were_made_with(
        committed_cpu, cifar_root, monkeypatch):
    """No second settings search: the transforms a chapter fits are the ones it shows."""
    monkeypatch.setenv("RMLIB_DATA", str(cifar_root))
    chapter = open_chapter("cifar100", "cpu")
    monkeypatch.setattr(type(chapter), "_missing", lambda *a: {})
    exp = chapter.experiment(transforms=("mcl-rho",))
    chosen = chapter.provenance["config"]["hyperparameter_selection"]
    assert exp.settings() is exp.selection and exp.selection == chosen


def test_smoke_results_of_an_older_rmlib_are_made_again(committed_cpu, smoke_config,
                                                        monkeypatch):
    """A cheap profile's results without rows the registry has now are remade, not shown."""
    import json

    monkeypatch.setenv("RMLIB_DATA", str(smoke_config.paths.data))
    folder = committed_cpu.parent / "smoke"
    folder.mkdir()
    for name in ("table1", "ablation"):
        body = json.loads((committed_cpu / f"{name}.json").read_text())
        body["rows"].pop("New+rho", None)
        (folder / f"{name}.json").write_text(json.dumps(body))
    chapter = open_chapter("cifar100", "smoke")
    assert "New+rho" in chapter.table and chapter.provenance["profile"] == "smoke"


def test_run_cost_counts_cached_work_once_and_work_done_in_the_run_not_twice():
    from rmlib.notebook import run_cost

    def found(step_fit: float) -> dict:
        prov = {"wall_time_s": 600.0, "machine": {"cpu": "CPU", "threads": 2},
                "backbone_train_seconds": {"old": 300.0, "bct": 1200.0},
                "transform_fit_seconds": {"rqt": 600.0},
                "step_seconds": {"backbone_old": 0.1, "backbone_bct": step_fit,
                                 "transform_rqt": step_fit / 2}}
        backbones = {"provenance": {"wall_time_s": 300.0, "train_wall_time_s": {"old": 300}}}
        return {"table1": {"provenance": prov}, "backbones": backbones}

    # bct and rqt read from the cache: their recorded 20 + 10 min come on top of 5 + 10 min
    assert run_cost(found(0.0)).startswith("45 min")
    # made in the run itself: already inside its wall time
    assert run_cost(found(1200.0)).startswith("15 min")
