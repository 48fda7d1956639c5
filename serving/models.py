"""The served models: champion and challenger from the MLflow registry, hot-swapped when a new
version is promoted, and the last good model kept when the registry cannot be reached or no longer
names a champion."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from serving.bundle import ServingModel
from serving.outage import Outage
from training.hybrid import HybridRecommender
from training.lineage import ModelLineage
from training.registry import CHALLENGER, CHAMPION

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _saved_lineage(entry: dict) -> ModelLineage | None:
    """The lineage the last good record kept (records written before it have none)."""
    saved = entry.get("lineage")
    return ModelLineage.from_json(saved, entry.get("created_at")) if saved else None


class Registry(Protocol):
    """What the manager needs of training.registry.ModelRegistry."""

    def get_version(self, alias: str): ...  # -> RegisteredVersion | None

    def get_numbered(self, version: str): ...  # -> RegisteredVersion | None

    def load_bundle(self, version: str) -> HybridRecommender: ...

    def bundle_path(self, version: str) -> Path: ...


@dataclass(frozen=True)
class ModelSet:
    """What serves right now; replaced as a whole, so a request sees one consistent pair."""

    champion: ServingModel | None = None
    challenger: ServingModel | None = None
    challenger_share: float = 0.0
    # Other registered versions that running experiments name (`version:N` arms), by version.
    versions: dict[str, ServingModel] = field(default_factory=dict)

    def for_user(self, user_id: str) -> ServingModel | None:
        """The challenger for a stable share of users (by a hash of the id), else the champion."""
        if self.challenger is not None and self.challenger_share > 0:
            bucket = zlib.crc32(user_id.encode()) % 10_000
            if bucket < self.challenger_share * 10_000:
                return self.challenger
        return self.champion


class ModelManager:
    """Loads the registry's champion/challenger, polls for promotions, swaps atomically."""

    def __init__(
        self,
        registry_factory: Callable[[], Registry],
        state_dir: Path,
        poll_seconds: float = 30.0,
        challenger_share: float = 0.1,
        on_change: Callable[[ModelSet], None] | None = None,
        prepare: Callable[[ServingModel], None] | None = None,
        wanted_versions: Callable[[], set[str]] | None = None,
    ) -> None:
        self._registry_factory = registry_factory
        self._registry: Registry | None = None
        self.state_file = Path(state_dir) / "last_good_models.json"
        self.poll_seconds = poll_seconds
        self.challenger_share = challenger_share
        self.on_change = on_change
        # Runs on each newly loaded model before it serves (e.g. to attach its blend weights),
        # so a request reads everything about its model from the one object it picked.
        self.prepare = prepare
        # The versions beside champion and challenger to keep loaded (experiment arms).
        self.wanted_versions = wanted_versions or set
        self.current = ModelSet(challenger_share=challenger_share)
        self.last_error: str | None = None
        self.last_check: float | None = None
        # One warning per registry outage, not one per poll.
        self.outage = Outage("model registry", errors=(Exception,))
        # The version kept while the registry names no champion (warned about once).
        self.orphaned: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = self._registry_factory()
        return self._registry

    def load_initial(self) -> ModelSet:
        """Load what the registry serves; if it cannot be reached, the last good local copy."""
        # Workers start together: one at a time, so the embedded MLflow store is created (and
        # its schema migrated) once rather than raced, and bundles are downloaded once.
        with _file_lock(self.state_file.with_name("registry.lock")):
            ok = self.refresh()
        if ok and self.current.champion is not None:
            return self.current
        # The registry is down, or names no champion (alias deleted): the last good copy serves,
        # as it would have had the service not restarted.
        models = self._load_last_good()
        if models.champion is not None:
            if ok:
                self.orphaned = models.champion.version
                log.warning(
                    "the model registry names no champion; serving the last good version %s "
                    "from disk until it names one",
                    models.champion.version,
                )
            else:
                log.warning(
                    "model registry unreachable (%s); serving last good version %s from disk",
                    self.last_error,
                    models.champion.version,
                )
            self._swap(ModelSet(models.champion, self.current.challenger, self.challenger_share))
        return self.current

    def refresh(self) -> bool:
        """Check the aliases once and swap in what changed; False if the registry failed."""
        with self._lock:
            self.last_check = time.time()
            try:
                wanted = {
                    variant: self.registry.get_version(variant)
                    for variant in (CHAMPION, CHALLENGER)
                }
                current = {CHAMPION: self.current.champion, CHALLENGER: self.current.challenger}
                loaded: dict[str, ServingModel | None] = {}
                for variant, info in wanted.items():
                    have = current[variant]
                    if info is None and variant == CHAMPION and have is not None:
                        # A deleted champion alias is an operator's or a script's mistake far
                        # more often than a wish to serve nothing: keep what serves.
                        loaded[variant] = have
                        if self.orphaned != have.version:
                            self.orphaned = have.version
                            log.warning(
                                "the model registry names no champion; keeping version %s",
                                have.version,
                            )
                    elif info is None:
                        loaded[variant] = None
                    elif have is not None and have.version == info.version:
                        loaded[variant] = have
                    else:
                        bundle = self.registry.load_bundle(info.version)
                        loaded[variant] = self._prepared(
                            ServingModel(bundle, info.version, variant, info.lineage())
                        )
                        log.info("loaded %s version %s", variant, info.version)
                versions = self._versions(loaded)
            # Any registry failure (network, auth, a corrupt artifact) keeps the last good models.
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.outage.failed(exc)
                # The next check builds a new client: a failed one may keep a dead connection.
                self._registry = None
                return False
            self.last_error = None
            self.outage.recovered()
            if wanted[CHAMPION] is not None:
                self.orphaned = None
            models = ModelSet(loaded[CHAMPION], loaded[CHALLENGER], self.challenger_share, versions)
            if models != self.current:
                self._swap(models)
                self._save_last_good(models)
            return True

    def _versions(self, loaded: dict[str, ServingModel | None]) -> dict[str, ServingModel]:
        """The experiment versions that neither alias names, kept or loaded now."""
        aliased = {m.version for m in loaded.values() if m is not None}
        have = self.current.versions
        versions = {}
        for version in sorted(self.wanted_versions() - aliased):
            if version in have:
                versions[version] = have[version]
            else:
                info = self.registry.get_numbered(version)
                bundle = self.registry.load_bundle(version)
                lineage = info.lineage() if info is not None else None
                versions[version] = self._prepared(
                    ServingModel(bundle, version, f"v{version}", lineage)
                )
                log.info("loaded version %s for an experiment", version)
        return versions

    def _prepared(self, model: ServingModel) -> ServingModel:
        if self.prepare is not None:
            self.prepare(model)
        return model

    def _swap(self, models: ModelSet) -> None:
        # One reference assignment: in-flight requests keep the set they started with.
        self.current = models
        if self.on_change is not None:
            self.on_change(models)

    def _save_last_good(self, models: ModelSet) -> None:
        if models.champion is None and models.challenger is None:
            return  # nothing serves: the last good record stays for the next start
        state = {
            variant: {
                "version": m.version,
                "path": str(self.registry.bundle_path(m.version)),
                "lineage": m.lineage.as_json(),
                "created_at": m.lineage.created_at,
            }
            for variant, m in ((CHAMPION, models.champion), (CHALLENGER, models.challenger))
            if m is not None
        }
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _load_last_good(self) -> ModelSet:
        if not self.state_file.exists():
            return ModelSet(challenger_share=self.challenger_share)
        try:
            state = json.loads(self.state_file.read_text())
            loaded = {
                variant: self._prepared(
                    ServingModel(
                        HybridRecommender.load(entry["path"]),
                        entry["version"],
                        variant,
                        _saved_lineage(entry),
                    )
                )
                for variant, entry in state.items()
                if variant in (CHAMPION, CHALLENGER)
            }
        # A broken local copy means starting without a model, not failing to start.
        except Exception as exc:
            log.warning("cannot load the last good models from %s: %s", self.state_file, exc)
            return ModelSet(challenger_share=self.challenger_share)
        return ModelSet(
            loaded.get(CHAMPION), loaded.get(CHALLENGER), challenger_share=self.challenger_share
        )

    def start(self) -> None:
        """Poll the registry every poll_seconds in a daemon thread."""
        if self._thread is not None or self.poll_seconds <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-poller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
