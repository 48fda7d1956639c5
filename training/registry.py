"""MLflow tracking and registry: log a training run, register the bundle, gate promotion.

A new version gets alias `challenger`; it becomes `champion` only when its validation nDCG@10
beats the current champion's by the configured margin. Nothing is registered unless the run
logged everything it needed, so a failed run leaves the current champion serving.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from config import get_settings
from training.hybrid import HybridRecommender
from training.lineage import ModelLineage, TrainingLineage

log = logging.getLogger(__name__)

EXPERIMENT = "recsys"
GATE_METRIC = "hybrid_validation_ndcg_at_10"
CHAMPION = "champion"
CHALLENGER = "challenger"
# The champion a promotion replaced: what `recsys rollback` and an automatic rollback return to.
PREVIOUS_CHAMPION = "previous-champion"
BUNDLE_ARTIFACT = "bundle"
# Logged as code rather than as a cloudpickled object: MLflow recommends it, and loading a version
# then runs this reviewed file instead of deserialising whatever the pickle holds.
PYFUNC_MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE_USERS = 3


def flatten_params(prefix: str, params: dict[str, Any]) -> dict[str, str]:
    """Nested params as flat MLflow params: {"als": {"factors": 64}} -> {"als.factors": "64"}."""
    out: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten_params(f"{prefix}{key}.", value))
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


def metric_key(name: str) -> str:
    """MLflow-safe metric name: `ndcg@10` -> `ndcg_at_10`."""
    return name.replace("@", "_at_").replace(" ", "_")


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """pyfunc flavour of the bundle: a frame of user_id in, user_id,item_id,rank,score out."""

    def load_context(self, context: Any) -> None:
        self.bundle = HybridRecommender.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        users = model_input["user_id"].astype(str).to_numpy()
        return self.bundle.recommend_ids(users, k=k).to_pandas()


SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "user_id")]),
    outputs=Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec("string", "item_id"),
            ColSpec("long", "rank"),
            ColSpec("double", "score"),
        ]
    ),
    params=ParamSchema([ParamSpec("k", "long", 10)]),
)
PIP_REQUIREMENTS = ["numpy", "scipy", "polars", "pandas", "implicit", "gensim", "mlflow"]


@dataclass
class RegisteredVersion:
    """One registered model version and the metrics of the run that produced it."""

    version: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    created_at: float | None = None  # epoch seconds

    @property
    def gate_value(self) -> float | None:
        return self.metrics.get(GATE_METRIC)

    def lineage(self) -> ModelLineage:
        """The version's lineage as its tags recorded it at registration."""
        trained = TrainingLineage.from_tags(self.tags)
        return ModelLineage(
            self.version,
            self.run_id or None,
            trained.dagster_run_id,
            trained.trained_by,
            self.created_at,
        )


class UnknownVersionError(LookupError):
    """The registered model has no such version."""


@dataclass
class GateDecision:
    """What the evaluation gate decided and why."""

    version: str
    promoted: bool
    challenger_value: float
    champion_version: str | None
    champion_value: float | None
    margin: float
    reason: str


class ModelRegistry:
    """The MLflow registered model that serves, with its champion/challenger aliases."""

    def __init__(
        self,
        tracking_uri: str,
        model_name: str,
        artifact_location: str | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_location = artifact_location
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.tracking_uri.startswith("sqlite:///"):
                # The embedded store's folder must exist before SQLAlchemy opens the file.
                Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                    parents=True, exist_ok=True
                )
            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        """The experiment's id, created (with this registry's artifact location) when missing."""
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        except MlflowException:
            # Another process created it between the lookup and the create.
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, run_name: str, tags: dict[str, str] | None = None) -> mlflow.ActiveRun:
        """Start an MLflow run in the platform's experiment (use as a context manager)."""
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.start_run(
            experiment_id=self.experiment_id(), run_name=run_name, tags=tags or {}
        )

    def log_bundle(self, bundle: HybridRecommender, lineage: TrainingLineage | None = None) -> str:
        """Log the bundle as a pyfunc model in the active run and register it; return version.

        `lineage` (who trained it, the Dagster run, the training data) is written as tags of the
        run and of the version, and its data summary as run params; without it the version reads
        `trained_by: python` (registered by a direct call, no orchestrator run).
        """
        lineage = lineage or TrainingLineage()
        tags = lineage.tags()
        mlflow.set_tags(tags)
        if lineage.data is not None:
            mlflow.log_params(lineage.data.tags())
        with tempfile.TemporaryDirectory() as tmp:
            path = bundle.save(Path(tmp) / BUNDLE_ARTIFACT)
            example = pd.DataFrame(
                {"user_id": [str(u) for u in bundle.user_ids[:INPUT_EXAMPLE_USERS]]}
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=PYFUNC_MODEL_CODE,
                artifacts={BUNDLE_ARTIFACT: str(path)},
                signature=SIGNATURE,
                input_example=example,
                pip_requirements=PIP_REQUIREMENTS,
                registered_model_name=self.model_name,
            )
        version = str(info.registered_model_version)
        for key, value in tags.items():
            self.client.set_model_version_tag(self.model_name, version, key, value)
        self.client.set_registered_model_alias(self.model_name, CHALLENGER, version)
        return version

    def get_version(self, alias: str) -> RegisteredVersion | None:
        """The version behind an alias, or None when there is no such model or alias."""
        try:
            mv = self.client.get_model_version_by_alias(self.model_name, alias)
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
                return None
            raise
        metrics: dict[str, float] = {}
        if mv.run_id:
            metrics = dict(self.client.get_run(mv.run_id).data.metrics)
        return self._registered(mv, metrics)

    def get_numbered(self, version: str) -> RegisteredVersion | None:
        """A version by its number (an experiment's `version:N` arm), or None."""
        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException:
            return None
        metrics = dict(self.client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
        return self._registered(mv, metrics)

    @staticmethod
    def _registered(mv: Any, metrics: dict[str, float]) -> RegisteredVersion:
        created = mv.creation_timestamp / 1000.0 if mv.creation_timestamp else None
        return RegisteredVersion(
            str(mv.version), mv.run_id or "", metrics, list(mv.aliases), dict(mv.tags), created
        )

    def describe(self, version: str) -> dict[str, Any]:
        """A version's chain as JSON: the version (aliases, tags, creation time), its MLflow run
        (id, name, status, metrics) and its recorded lineage. `UnknownVersionError` names the
        versions there are when this one does not exist."""
        try:
            mv = self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            if "RESOURCE_DOES_NOT_EXIST" not in str(exc.error_code):
                raise
            raise UnknownVersionError(self._unknown_message(str(version))) from None
        run: dict[str, Any] | None = None
        metrics: dict[str, float] = {}
        if mv.run_id:
            found = self.client.get_run(mv.run_id)
            metrics = dict(found.data.metrics)
            run = {
                "run_id": mv.run_id,
                "run_name": found.info.run_name,
                "status": found.info.status,
                "start_time": found.info.start_time / 1000.0 if found.info.start_time else None,
                "metrics": metrics,
                "tags": {k: v for k, v in found.data.tags.items() if not k.startswith("mlflow.")},
            }
        registered = self._registered(mv, metrics)
        trained = TrainingLineage.from_tags(registered.tags)
        return {
            "model_name": self.model_name,
            "version": registered.version,
            "aliases": sorted(registered.aliases),
            "created_at": registered.created_at,
            "tags": registered.tags,
            "mlflow_run": run,
            "trained_by": trained.trained_by,
            "dagster_run_id": trained.dagster_run_id,
            "data": None if trained.data is None else trained.data.__dict__.copy(),
        }

    def _unknown_message(self, version: str) -> str:
        try:
            found = self.client.search_model_versions(f"name = '{self.model_name}'")
        except MlflowException:
            found = []
        known = sorted((str(v.version) for v in found), key=lambda v: int(v) if v.isdigit() else 0)
        there = f"registered versions: {', '.join(known)}" if known else "it has no version yet"
        return f"model {self.model_name!r} has no version {version!r}; {there}"

    def decide(self, challenger_value: float, margin: float, version: str = "") -> GateDecision:
        """What the gate decides for a challenger of this value against today's champion.

        Changes nothing: the pipeline decides before it pushes features, and registers last.
        """
        champion = self.get_version(CHAMPION)
        champ_value = champion.gate_value if champion else None
        if champion is None or champ_value is None:
            promoted, reason = True, "no champion yet"
        elif challenger_value >= champ_value + margin:
            promoted = True
            reason = f"{challenger_value:.4f} >= champion {champ_value:.4f} + margin {margin}"
        else:
            promoted = False
            reason = f"{challenger_value:.4f} < champion {champ_value:.4f} + margin {margin}"
        return GateDecision(
            version,
            promoted,
            challenger_value,
            champion.version if champion else None,
            champ_value,
            margin,
            reason,
        )

    def gate(self, version: str, challenger_value: float, margin: float) -> GateDecision:
        """Promote `version` to champion if it beats the champion by `margin` (or none exists)."""
        decision = self.decide(challenger_value, margin, version)
        if decision.promoted:
            self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        self.client.set_model_version_tag(self.model_name, version, "gate", decision.reason)
        log.info("gate for version %s: %s", version, decision.reason)
        return decision

    # -- online decisions (experiments) --------------------------------------------------------

    def version_exists(self, version: str) -> bool:
        """Whether `version` is a registered version of this model."""
        return self.get_numbered(version) is not None

    def promote(self, version: str, reason: str) -> str | None:
        """Make `version` the champion and remember the one it replaces (the alias
        PREVIOUS_CHAMPION and a tag on the new version) for a rollback; returns that one."""
        version = str(version)
        previous = self.get_version(CHAMPION)
        if previous is not None and previous.version == version:
            return None
        self.client.set_registered_model_alias(self.model_name, CHAMPION, version)
        if previous is not None:
            self.client.set_registered_model_alias(
                self.model_name, PREVIOUS_CHAMPION, previous.version
            )
            self.client.set_model_version_tag(
                self.model_name, version, "replaced_champion", previous.version
            )
        challenger = self.get_version(CHALLENGER)
        if challenger is not None and challenger.version == version:
            self.client.delete_registered_model_alias(self.model_name, CHALLENGER)
        self.client.set_model_version_tag(self.model_name, version, "promoted", reason)
        log.info("promoted version %s to champion: %s", version, reason)
        return previous.version if previous is not None else None

    def rollback(self, reason: str) -> tuple[str, str]:
        """Move `champion` back to the version it replaced; returns (from, to). RuntimeError
        when there is nothing to roll back to."""
        current = self.get_version(CHAMPION)
        previous = self.get_version(PREVIOUS_CHAMPION)
        if current is None:
            raise RuntimeError(f"model {self.model_name!r} has no champion to roll back")
        if previous is None or previous.version == current.version:
            raise RuntimeError(
                f"champion version {current.version} replaced no earlier version: nothing to "
                "roll back to (promote a version by hand with the MLflow UI or client)"
            )
        self.client.set_registered_model_alias(self.model_name, CHAMPION, previous.version)
        self.client.delete_registered_model_alias(self.model_name, PREVIOUS_CHAMPION)
        self.client.set_model_version_tag(self.model_name, current.version, "rolled_back", reason)
        log.info("champion back from %s to %s: %s", current.version, previous.version, reason)
        return current.version, previous.version

    def tag_version(self, version: str, key: str, value: str) -> None:
        """Record something on a version (an experiment's decision, say)."""
        self.client.set_model_version_tag(self.model_name, str(version), key, value[:5000])

    def resolve(self, alias_or_version: str) -> str | None:
        """The version an alias (champion, challenger) or a version number names, or None."""
        if alias_or_version.isdigit():
            return alias_or_version if self.version_exists(alias_or_version) else None
        found = self.get_version(alias_or_version)
        return found.version if found is not None else None

    def download_uri(self, version: str) -> str:
        """Where a version's model files live, resolved through this registry's own client.

        MLflow's `models:/` artifact repository looks the version up through the process-wide
        registry URI (`mlflow.get_registry_uri()`), not the one passed to it, so a service that
        never set MLFLOW_TRACKING_URI would ask MLflow's default store (an empty `./mlflow.db`).
        """
        uri = self.client.get_model_version_download_uri(self.model_name, version)
        if uri.startswith("models:/"):
            # MLflow 3 registers a logged model (`models:/m-...`): its artifact location.
            uri = self.client.get_logged_model(
                uri.removeprefix("models:/").strip("/")
            ).artifact_location
        return uri

    def bundle_path(self, version: str) -> Path:
        """The bundle folder of a version, downloaded once into the local cache."""
        base = self.cache_dir or get_settings().model_cache()
        target = base / self.model_name / str(version)
        marker = target / ".complete"
        if marker.exists():
            return target / BUNDLE_ARTIFACT
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="download-", dir=base))
        try:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{self.download_uri(version).rstrip('/')}/artifacts/"
                    f"{BUNDLE_ARTIFACT}",
                    dst_path=str(tmp),
                    tracking_uri=self.tracking_uri,
                    registry_uri=self.tracking_uri,
                )
            )
            if target.exists():
                shutil.rmtree(target)
            target.mkdir(parents=True)
            shutil.move(local, target / BUNDLE_ARTIFACT)
            marker.touch()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target / BUNDLE_ARTIFACT

    def load_bundle(self, version: str) -> HybridRecommender:
        """Download (once) and load the bundle of a registered version."""
        return HybridRecommender.load(self.bundle_path(version))
