"""The lock files agree with pyproject.toml: every declared dependency is pinned, with hashes, at
a version its specifier admits (`make lock` regenerates them after a change)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)", re.MULTILINE)


def _pins(path: Path) -> dict[str, str]:
    text = path.read_text()
    assert "--hash=sha256:" in text, f"{path.name} has no hashes"
    return {canonicalize_name(name): version for name, version in PIN.findall(text)}


def _declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in names]


@pytest.mark.parametrize(
    ("lock", "groups"),
    [("requirements.lock", [None]), ("requirements-dev.lock", [None, "dev"])],
)
def test_every_dependency_is_pinned_within_its_specifier(lock: str, groups: list) -> None:
    pins = _pins(ROOT / lock)
    for group in groups:
        for requirement in _declared(group):
            name = canonicalize_name(requirement.name)
            assert name in pins, f"{lock} does not pin {requirement.name}; run `make lock`"
            assert requirement.specifier.contains(pins[name], prereleases=True), (
                f"{lock} pins {requirement.name}=={pins[name]}, outside {requirement.specifier}"
            )


def test_the_dev_lock_keeps_the_runtime_versions() -> None:
    runtime, dev = _pins(ROOT / "requirements.lock"), _pins(ROOT / "requirements-dev.lock")
    differ = {n: (v, dev.get(n)) for n, v in runtime.items() if dev.get(n) != v}
    assert not differ, f"the image and the tests would run different versions: {differ}"
