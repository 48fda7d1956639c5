"""API keys: the scopes a key can have, the operator's hashed keys (the keys file and
RECSYS_API_KEYS), `recsys api-key create`, and the bind policy of `recsys serve`.

serving/auth.py holds the scope each route needs and the guard that checks a request with these
keys.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serving.settings import ServingSettings

READ, INGEST, ADMIN, METRICS = "read", "ingest", "admin", "metrics"
# `metrics` is for a Prometheus scraper when RECSYS_METRICS_OPEN=0. No scope implies another:
# an admin key reads only if it also has `read`.
SCOPES = (READ, INGEST, ADMIN, METRICS)

KEY_PREFIX = "rsk_"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


class AuthConfigError(ValueError):
    """The keys file or setting cannot be used, or the bind policy refuses the address."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the operator configured it; only the SHA-256 of the key is ever stored."""

    name: str
    sha256: str
    scopes: frozenset[str]
    rate_limit: float | None = None  # requests per second per scope, instead of the scope's

    def entry(self) -> dict[str, Any]:
        """The key as an entry of the keys file."""
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        out["scopes"] = sorted(self.scopes)
        if self.rate_limit is not None:
            out["rate_limit"] = self.rate_limit
        return out


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for `key`. Keys are 256 random bits, so a fast hash
    is enough: there is nothing to guess that a slow one would protect."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A new random key (256 bits, URL-safe, with a prefix that secret scanners recognise)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_key(entry: object, where: str) -> ApiKey:
    """One entry `{name, sha256, scopes, rate_limit?}`; `where` names it in the error."""
    if not isinstance(entry, dict):
        raise AuthConfigError(f"{where}: each key must be an object {{name, sha256, scopes}}")
    unknown = set(entry) - {"name", "sha256", "scopes", "rate_limit"}
    if unknown:
        raise AuthConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
    name, digest, scopes = entry.get("name"), entry.get("sha256"), entry.get("scopes")
    if not isinstance(name, str) or not _NAME.match(name):
        raise AuthConfigError(
            f"{where}: name must be 1-64 letters, digits, '.', '_' or '-': {name!r}"
        )
    if not isinstance(digest, str) or not _HEX64.match(digest):
        raise AuthConfigError(
            f"{where} ({name}): sha256 must be the 64 lower-case hex digits of the key's SHA-256 "
            "(the key itself is never stored; `recsys api-key create` writes the entry)"
        )
    if isinstance(scopes, str):
        scopes = [s.strip() for s in scopes.split(",")]
    if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
        raise AuthConfigError(f"{where} ({name}): scopes must be a list of {SCOPES}: {scopes!r}")
    rate = entry.get("rate_limit")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)):
        raise AuthConfigError(f"{where} ({name}): rate_limit must be a number: {rate!r}")
    if rate is not None and rate <= 0:
        raise AuthConfigError(f"{where} ({name}): rate_limit must be > 0 requests per second")
    return ApiKey(name, digest, frozenset(scopes), float(rate) if rate is not None else None)


def _entries(document: object, where: str) -> list[object]:
    if isinstance(document, dict) and set(document) == {"keys"}:
        document = document["keys"]
    if not isinstance(document, list):
        raise AuthConfigError(f'{where} must be {{"keys": [{{name, sha256, scopes}}, ...]}}')
    return document


def read_keys_file(path: Path) -> list[ApiKey]:
    """The keys of a keys file (JSON `{"keys": [...]}`)."""
    if not path.exists():
        raise AuthConfigError(
            f"the API keys file {path} does not exist: create a key with "
            f"`recsys api-key create --name NAME --scopes read --file {path}`"
        )
    try:
        document = json.loads(path.read_text() or '{"keys": []}')
    except ValueError as exc:
        raise AuthConfigError(f"the API keys file {path} is not valid JSON: {exc}") from exc
    entries = _entries(document, str(path))
    return [parse_key(e, f"{path}: keys[{i}]") for i, e in enumerate(entries)]


def _parse_inline(raw: str) -> list[ApiKey]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise AuthConfigError(f"RECSYS_API_KEYS is not valid JSON: {exc}") from exc
    entries = _entries(document, "RECSYS_API_KEYS")
    return [parse_key(e, f"RECSYS_API_KEYS[{i}]") for i, e in enumerate(entries)]


class KeyRing:
    """The configured keys, looked up by the hash of the presented key."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._by_hash: dict[bytes, tuple[bytes, ApiKey]] = {}
        names: set[str] = set()
        for key in keys:
            if key.name in names:
                raise AuthConfigError(f"two API keys are named {key.name!r}")
            digest = bytes.fromhex(key.sha256)
            if digest in self._by_hash:
                raise AuthConfigError(
                    f"API keys {self._by_hash[digest][1].name!r} and {key.name!r} are the same key"
                )
            names.add(key.name)
            self._by_hash[digest] = (digest, key)

    @classmethod
    def from_settings(cls, settings: ServingSettings) -> KeyRing:
        """The keys of RECSYS_API_KEYS_FILE and RECSYS_API_KEYS together."""
        keys: list[ApiKey] = []
        if settings.api_keys_file:
            keys += read_keys_file(Path(settings.api_keys_file).expanduser())
        if settings.api_keys.strip():
            keys += _parse_inline(settings.api_keys)
        return cls(keys)

    def __len__(self) -> int:
        return len(self._by_hash)

    @property
    def keys(self) -> list[ApiKey]:
        return [key for _, key in self._by_hash.values()]

    def find(self, presented: str) -> ApiKey | None:
        """The key whose hash is the hash of `presented`, else None.

        The dict lookup runs on the SHA-256 of what the client sent, so its timing says
        something about that digest only, never about a stored key; the final comparison is
        constant-time all the same."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = self._by_hash.get(digest)
        if found is None or not hmac.compare_digest(found[0], digest):
            return None
        return found[1]


def add_key(path: Path, name: str, scopes: Sequence[str], rate_limit: float | None) -> str:
    """Create a key, append its hash to the keys file `path` (created with mode 0600) and return
    the key: the only time anyone sees it."""
    key = new_key()
    entry = parse_key(
        {"name": name, "sha256": hash_key(key), "scopes": list(scopes), "rate_limit": rate_limit}
        if rate_limit is not None
        else {"name": name, "sha256": hash_key(key), "scopes": list(scopes)},
        "the new key",
    )
    existing = read_keys_file(path) if path.exists() else []
    KeyRing([*existing, entry])  # refuses a second key of the same name
    document = {"keys": [k.entry() for k in (*existing, entry)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written beside and renamed over: a crash leaves the old file whole.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return key


# -- the bind policy of `recsys serve` ------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def bind_policy(host: str, keys: KeyRing, insecure: bool) -> str:
    """The start-up line for serving on `host` with `keys`; refuses (AuthConfigError) to serve
    beyond loopback without keys unless `insecure`."""
    if len(keys):
        return f"API keys: {len(keys)} configured; requests without a valid key get 401"
    if is_loopback(host):
        return (
            f"no API keys configured: the service on {host} answers every request without a "
            "key (loopback only; set RECSYS_API_KEYS_FILE to require keys)"
        )
    if insecure:
        return (
            f"INSECURE: no API keys configured and --insecure given: anyone who can reach "
            f"{host} can read, write events and call admin routes"
        )
    raise AuthConfigError(
        f"refusing to serve on {host} without API keys: anyone who can reach it could write "
        "events and call admin routes. Create one with `recsys api-key create --name NAME "
        "--scopes read,ingest --file FILE` and set RECSYS_API_KEYS_FILE=FILE, serve on "
        "127.0.0.1, or pass --insecure to serve open on purpose"
    )
