"""Which model serves a request: the running experiments (reloaded in the background from the
experiment store, never read on a request) assign the user to an arm; without an experiment the
champion serves, or the challenger for its hash-stable share of users."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from feature_repo.experiment_store import ExperimentStore, open_experiment_store
from serving.bundle import ServingModel
from serving.models import ModelSet
from training.experiments import POPULARITY, Arm, Experiment, choose, target_version
from training.registry import CHALLENGER, CHAMPION

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What answers one request: its model (None: the popularity policy), the variant its
    answer and impression are labelled with, and the experiment that chose it. An
    interleaving experiment ranks with both `rivals` (arm name, model) and merges them."""

    model: ServingModel | None
    variant: str
    experiment: str | None = None
    rivals: tuple[tuple[str, ServingModel | None], ...] = ()


def resolve(models: ModelSet, target: str) -> tuple[ServingModel | None, bool]:
    """The model an arm target names in the loaded set, and whether it is loaded (the
    popularity policy always is)."""
    if target == POPULARITY:
        return None, True
    if target == CHAMPION:
        return models.champion, models.champion is not None
    if target == CHALLENGER:
        return models.challenger, models.challenger is not None
    version = target_version(target)
    for model in (models.champion, models.challenger, *models.versions.values()):
        if model is not None and model.version == version:
            return model, True
    return None, False


class ExperimentRouter:
    """The running experiments of this worker, reloaded every `refresh_seconds`."""

    def __init__(self, load: Callable[[], list[Experiment]], refresh_seconds: float = 5.0) -> None:
        self._load = load
        self.refresh_seconds = refresh_seconds
        self.experiments: tuple[Experiment, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._missing_warned: set[tuple[str, str]] = set()
        self.on_change: Callable[[tuple[Experiment, ...]], None] | None = None

    def reload(self) -> None:
        try:
            running = tuple(e for e in self._load() if e.running)
        except Exception as exc:  # noqa: BLE001 - a store failure keeps the experiments running
            log.warning("cannot reload the experiments (kept the last ones): %s", exc)
            return
        if running != self.experiments:
            self.experiments = running
            log.info("experiments running: %s", ", ".join(e.name for e in running) or "none")
            if self.on_change is not None:
                self.on_change(running)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="experiments", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_seconds):
            self.reload()

    def versions(self) -> set[str]:
        """The registered versions the running experiments name (`version:N` arms)."""
        return {v for e in self.experiments for v in e.versions()}

    def route(self, models: ModelSet, user_id: str | None) -> Served:
        """The model, variant and experiment of one user's request; a request without a user
        (/similar_items, /popular, /trending) is the champion's."""
        if user_id is None:
            model = models.champion
            return Served(model, model.variant if model is not None else POPULARITY)
        choice = choose(self.experiments, user_id) if self.experiments else None
        if choice is None:
            model = models.for_user(user_id)
            return Served(model, model.variant if model is not None else POPULARITY)
        experiment, arm = choice
        if experiment.kind == "interleave":
            rivals = tuple(self._model(models, experiment, a) for a in experiment.arms)
            if rivals[0][0] == rivals[1][0]:  # one ranker missing: nothing to interleave
                return Served(rivals[0][1], rivals[0][0], experiment.name)
            return Served(rivals[0][1], "interleaved", experiment.name, rivals)
        variant, model = self._model(models, experiment, arm)
        return Served(model, variant, experiment.name)

    def _model(
        self, models: ModelSet, experiment: Experiment, arm: Arm
    ) -> tuple[str, ServingModel | None]:
        """(the arm's name, its model), or the control's when the arm's model is not loaded:
        its users are then served and counted as the control's, so the report's
        sample-ratio check flags the experiment instead of comparing the control with itself
        under another name. Said once per arm."""
        model, loaded = resolve(models, arm.target)
        if loaded:
            return arm.name, model
        if (experiment.name, arm.name) not in self._missing_warned:
            self._missing_warned.add((experiment.name, arm.name))
            log.warning(
                "experiment %s: arm %s (%s) has no loaded model; it serves the control's",
                experiment.name,
                arm.name,
                arm.target,
            )
        return experiment.control.name, resolve(models, experiment.control.target)[0]


class ExperimentLoader:
    """Reads the running experiments over one store connection, dropped on a failure."""

    def __init__(self, postgres_url: str | None, home: Path) -> None:
        self.postgres_url = postgres_url
        self.home = home
        self._store: ExperimentStore | None = None

    def __call__(self) -> list[Experiment]:
        if self._store is None:
            self._store = open_experiment_store(self.postgres_url, self.home)
        try:
            return self._store.running()
        except Exception:
            self._store.close()
            self._store = None
            raise
