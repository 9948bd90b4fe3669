"""What a chapter of the book opens with: the configuration, built once from the environment,
and the results it shows. A chapter never starts a long run by itself: where a profile's
results or cached models are missing it says what is missing, what making them cost when
it was measured, and the one command that makes them (with progress bars).

Explained in the book: book/table1.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmlib import RmlibError
from rmlib.config import Config
from rmlib.engine.transforms import TransformConfig, transform_path
from rmlib.evaluation.curves import BackfillCurve
from rmlib.methods.experiment import Experiment
from rmlib.methods.reproduce import (
    RESULT_TABLES,
    RESULTS_FORMAT,
    curve_of,
    read_results,
    reproduce,
)
from rmlib.report import provenance_line
from rmlib.tables import (
    departures_frame,
    run_frame,
    seeds_caption,
    styled_conditions,
    styled_paper,
    styled_results,
)

CHEAP_PROFILES = ("smoke",)  # made on the spot when missing: a minute or two on a CPU
FALLBACK_PROFILE = "cpu"  # committed with the repository; shown when another is missing
RESULT_FILES = ("table1", "ablation")  # needed; the other results files are optional


class NeedsRun(RmlibError):
    """What a chapter needs and no run has made yet, with the command that makes it."""


def saved_results(dataset: str, config: Config) -> dict | None:
    """{"table1": ..., "ablation": ..., "baselines": ..., "centring": ..., "backbones": ...}
    of a profile, or None if a Table 1 / ablation file is missing (the others are
    optional: results made before them)."""
    folder = config.results_folder(dataset)
    found = {name: read_results(folder / f"{name}.json")
             for name in (*RESULT_TABLES, "backbones")}
    return found if all(found[n] is not None for n in RESULT_FILES) else None


def _complete(found: dict) -> bool:
    """Whether results hold every row the registry defines now, in today's format."""
    return found["table1"].get("format") == RESULTS_FORMAT and all(
        set(rows) <= set((found.get(name) or {}).get("rows", {}))
        for name, rows in RESULT_TABLES.items())


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _measured_on(prov: dict) -> str:
    machine = prov.get("machine", {})
    hw = machine.get("gpu") or machine.get("cpu") or "an unrecorded machine"
    return f"{hw}, {machine.get('threads', '?')} threads"


def run_cost(found: dict) -> str:
    """'63 min on AMD EPYC, 2 threads': what the run behind a profile's results took, as
    their provenance recorded it: the `train` run's wall time, the results file's own wall
    time, and the training and fitting that file's run read from the cache instead of doing
    (recorded when they were made; what the run did itself is already in its wall time)."""
    prov = found["table1"]["provenance"]
    backbones = (found.get("backbones") or {}).get("provenance", {})
    trained_first = set(backbones.get("train_wall_time_s", {})) or {"old", "new"}
    steps = prov.get("step_seconds", {})
    earlier = [seconds - steps.get(f"backbone_{role}", 0.0)
               for role, seconds in prov.get("backbone_train_seconds", {}).items()
               if role not in trained_first]
    earlier += [seconds - steps.get(f"transform_{key}", 0.0)
                for key, seconds in prov.get("transform_fit_seconds", {}).items()]
    total = (backbones.get("wall_time_s", 0.0) + prov.get("wall_time_s", 0.0)
             + sum(max(0.0, s) for s in earlier))
    return f"{_minutes(total)} on {_measured_on(prov)}"


@dataclass
class Chapter:
    """A chapter's configuration and the results of its profile (Table 1, ablation,
    backbones), with `note` saying where they come from."""

    dataset: str
    config: Config
    results: dict
    note: str

    @property
    def table(self) -> dict:
        return self.results["table1"]["rows"]

    @property
    def ablation(self) -> dict:
        return self.results["ablation"]["rows"]

    @property
    def baselines(self) -> dict:
        """The baselines as published beside their variants ({} in results made before)."""
        return (self.results.get("baselines") or {}).get("rows", {})

    @property
    def centring(self) -> dict:
        """The centred rows and the decision taken on validation ({} in results made
        before)."""
        return self.results.get("centring") or {}

    @property
    def provenance(self) -> dict:
        return self.results["table1"]["provenance"]

    def rows(self, *names: str) -> dict[str, dict]:
        """Results rows by name, from Table 1 or the ablation (all of Table 1 if none)."""
        both = {**self.centring.get("rows", {}), **self.baselines, **self.ablation,
                **self.table}
        missing = [n for n in names if n not in both]
        if missing:
            raise RmlibError(f"no results row {missing} in this profile's results; the rows "
                             f"are {sorted(both)}")
        return {n: both[n] for n in names} if names else dict(self.table)

    def curves(self, *names: str) -> dict[str, BackfillCurve]:
        """The rows' mean backfill curves, with their spread over seeds for the bands."""
        return {n: curve_of(r) for n, r in self.rows(*names).items()}

    def results_table(self, *names: str, caption: str = "",
                      backbones: dict | None = None):
        """The rows as an HTML table: AUC mAP and top-1 (mean ± std), Gain, order; with
        `backbones` (the backbone-seeds study's rows), ties judged against the larger of
        the spreads over seeds and over backbones."""
        return styled_results(self.rows(*names), caption, backbones)

    def conditions_table(self, *names: str, caption: str = ""):
        """The rows' conditions (6)-(8) on mAP and top-1, (8) as the largest fall."""
        return styled_conditions(self.rows(*names), caption)

    def paper_table(self, *names: str, caption: str = "the paper's Table 1 (CIFAR-100)"):
        """The paper's numbers for the rows it reports, in a table of their own."""
        return styled_paper(self.rows(*names), self.results["table1"].get("paper", {}), caption)

    def study(self, name: str) -> dict:
        """A study (a name of `rmlib.methods.studies.STUDIES`) of this chapter's profile:
        read from its results file, made on the spot for a cheap profile, else NeedsRun."""
        from rmlib.methods.reproduce import study_path
        from rmlib.methods.studies import STUDIES

        make = STUDIES[name]
        path = study_path(self.dataset, self.config, name)
        found = read_results(path)
        if found is not None:
            return found
        if self.config.name in CHEAP_PROFILES:
            return make(self.dataset, self.config)
        raise NeedsRun(f"no {name} study of the {self.config.name} profile in {path.parent}; "
                       f"run `!python -m rmlib study {name} {self.dataset} --profile "
                       f"{self.config.name}` (progress bars)")

    def profile_costs(self) -> str:
        """What this chapter's results cost in each profile, as Markdown bullets, from the
        committed results' provenance (never typed by hand)."""
        lines = ["- `smoke` (CI): tiny models on a data subset, made on the spot when the "
                 "chapter opens, in a minute or two on a CPU."]
        cpu = saved_results(self.dataset, Config.from_env("cpu"))
        lines.append("- `cpu`: " + (f"made by `scripts/run_cpu_profile.sh` ({run_cost(cpu)}: "
                                    "recorded training, fitting and evaluation); the "
                                    "chapter reads them in seconds." if cpu else
                                    "not yet run."))
        paper = read_results(Config.from_env("paper").results_folder(self.dataset)
                             / "backbones.json")
        if paper and paper.get("provenance", {}).get("wall_time_s"):
            prov = paper["provenance"]
            lines.append(f"- `paper` (one GPU): the old and new backbones in "
                         f"{_minutes(prov['wall_time_s'])} on {_measured_on(prov)}; the rest "
                         f"of its run is not yet measured.")
        else:
            lines.append("- `paper` (one GPU): not yet run.")
        return "\n".join(lines)

    def glue_costs(self, name: str = "profile_costs") -> None:
        """Glue `profile_costs` as Markdown under `name`, for the chapter's opening box
        ({glue:md}`profile_costs`)."""
        from IPython.display import Markdown
        from myst_nb import glue

        glue(name, Markdown(self.profile_costs()), display=False)

    def seeds_caption(self) -> str:
        return seeds_caption(self.table, self.provenance)

    def departures(self):
        """Where this run and the paper part ways, as a table (rmlib.tables)."""
        return departures_frame(self.table, self.results["table1"].get("paper", {}))

    def run_table(self):
        """Seconds per step of the run behind the results, and the machine it ran on."""
        print(f"{_measured_on(self.provenance)}; commit {self.provenance.get('git_commit')}")
        return run_frame(self.provenance, self.results.get("backbones"))

    def _missing(self, exp: Experiment, roles: tuple[str, ...],
                 transforms: tuple[str, ...]) -> dict[str, float]:
        """The cached runs `exp` would have to make, each with its measured seconds."""
        prov, runs = self.provenance, self.config.paths.runs
        trained = prov.get("backbone_train_seconds", {})
        missing = {f"backbone {r}": trained.get(r, 0.0) for r in roles
                   if not (exp.setup.backbone_config(r).run_dir(runs) / "model.pt").exists()}
        folder = runs / self.dataset / self.config.name
        configs = prov["config"].get("transforms", {})
        fitted = prov.get("transform_fit_seconds", {})
        for name in transforms:
            if name not in configs:
                continue  # results written before this transform existed: make it on use
            if not transform_path(TransformConfig(**configs[name]), folder).exists():
                missing[f"transform {name}"] = fitted.get(name, 0.0)
        return missing

    def experiment(self, roles: tuple[str, ...] = ("old", "new"),
                   transforms: tuple[str, ...] = ()) -> Experiment:
        """The backbones, embeddings and transforms behind the results, from the run cache.

        Raises NeedsRun, with the measured time and the command, when `roles` or
        `transforms` are not cached and the profile takes more than a few minutes.
        """
        exp = Experiment(self.dataset, self.config, progress=False)
        if self.config.name in CHEAP_PROFILES:
            return exp
        # the settings the results were made with: the chapter fits what the results show,
        # without searching them again
        exp.selection = self.provenance["config"].get("hyperparameter_selection")
        missing = self._missing(exp, roles, transforms)
        if missing:
            cost = sum(missing.values())
            # `train` makes the old and new backbones; anything else needs `reproduce`
            only_base = set(missing) <= {"backbone old", "backbone new"}
            which = f"train {self.dataset} both" if only_base else f"reproduce {self.dataset}"
            raise NeedsRun(
                f"this cell needs the {self.config.name} profile's {', '.join(missing)}, not in "
                f"the run cache {self.config.paths.runs}; making them took {_minutes(cost)} on "
                f"{_measured_on(self.provenance)}; run `!python -m rmlib {which} "
                f"--profile {self.config.name}` (progress bars), then this cell again")
        return exp


def open_chapter(dataset: str = "cifar100", profile: str | None = None) -> Chapter:
    """The configuration (RMLIB_PROFILE, else cpu on a CPU and paper on a GPU) and the
    results of its profile. A cheap profile's missing results are made on the spot; a
    costly one's are replaced by the committed cpu profile's, saying so and how to make
    them; with neither, NeedsRun says what to run."""
    chapter = Chapter(dataset, *_shown_results(dataset, Config.from_env(profile)))
    print(chapter.note)
    return chapter


def _shown_results(dataset: str, config: Config) -> tuple[Config, dict, str]:
    """The profile whose results a chapter shows, those results, and a note of where they
    come from."""
    found = saved_results(dataset, config)
    if config.name in CHEAP_PROFILES and (found is None or not _complete(found)):
        # missing, or written by an older rmlib without rows the registry has now
        found = reproduce(dataset, config, progress=False, backbones=True)
    if found is not None:
        return config, found, provenance_line(found["table1"]["provenance"])
    command = f"`!python -m rmlib reproduce {dataset} --profile {config.name}`"
    fallback = Config.from_env(FALLBACK_PROFILE) if config.name != FALLBACK_PROFILE else None
    found = saved_results(dataset, fallback) if fallback else None
    if found is None:
        raise NeedsRun(f"no {config.name}-profile results in {config.paths.results}, and "
                       f"no run of it was measured here; run {command}")
    note = (f"No `{config.name}` results yet: this page shows the committed "
            f"`{FALLBACK_PROFILE}` profile's. {command} makes them (not measured here; "
            f"the `{FALLBACK_PROFILE}` run took {run_cost(found)}).\n")
    return fallback, found, note + provenance_line(found["table1"]["provenance"])
