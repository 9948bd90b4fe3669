"""What a chapter of the book opens with: the configuration, built once from the environment,
and the results it shows (read from the results folder, or run when missing)."""

from __future__ import annotations

from dataclasses import dataclass

from rmlib.config import Config
from rmlib.methods.experiment import Experiment
from rmlib.methods.reproduce import results
from rmlib.provenance import commit_at_start
from rmlib.report import provenance_line


@dataclass
class Chapter:
    """A chapter's configuration and the Table 1 / ablation rows of its profile."""

    config: Config
    results: dict

    @property
    def table(self) -> dict:
        return self.results["table1"]["rows"]

    @property
    def ablation(self) -> dict:
        return self.results["ablation"]["rows"]

    def experiment(self, dataset: str = "cifar100") -> Experiment:
        """The backbones, embeddings and transforms behind the results (cached on disk)."""
        return Experiment(dataset, self.config, progress=False)


def open_chapter(dataset: str = "cifar100", profile: str | None = None) -> Chapter:
    """The configuration (RMLIB_PROFILE etc.; cpu on a CPU, paper on a GPU) and the results
    of its profile, with the line that says where they come from."""
    config = Config.from_env(profile)
    commit_at_start(config.commit)  # results record the code the chapter started with
    found = results(dataset, config)
    print(provenance_line(found["table1"]["provenance"]))
    return Chapter(config, found)
