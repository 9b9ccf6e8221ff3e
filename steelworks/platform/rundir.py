"""Run directories and stage manifests.

Every stage writes ``runs/<run>/<stage>/`` and finishes by writing ``manifest.json`` there:
the resolved config, the manifests of its inputs (path + sha256), every output file with
its sha256 and size, metrics, timing and the package version.  The manifest is written
last and atomically, so a directory without one is an unfinished stage.

A stage is skipped when its manifest exists, its fingerprint (config + input manifest
hashes + package version) is unchanged, and all its outputs are present with the recorded
sizes. ``--force`` re-runs it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelworks import __version__
from steelworks.platform.atomic import atomic_write_json, sha256_file, sha256_json

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
# Config keys whose values are secrets: a manifest (and the fingerprint hashed from the same
# config: a hash of a short key can be brute-forced) shows only that one was set.
SECRET_KEYS = frozenset({"api_key", "token", "auth_token", "access_token", "password", "secret"})
REDACTED = "<redacted>"


def redact_secrets(obj: Any) -> Any:
    """``obj`` (nested dicts/lists) with the value of every secret key replaced by REDACTED."""
    if isinstance(obj, dict):
        return {k: REDACTED if k in SECRET_KEYS and v not in (None, "") else redact_secrets(v)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_secrets(v) for v in obj]
    return obj


class StageInputError(RuntimeError):
    """A stage's input stage has not completed (no manifest)."""


def run_dir(runs_dir: str | Path, run: str) -> Path:
    return Path(runs_dir) / run


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        raise StageInputError(
            f"{path} does not exist: stage {Path(stage_dir).name!r} has not completed; run it first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class Stage:
    """One stage's output directory, its cache check and its manifest writer."""

    dir: Path
    name: str
    config: dict[str, Any]
    inputs: dict[str, Path] = field(default_factory=dict)  # input stage name -> its directory
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.config = redact_secrets(self.config)  # whatever the caller passed: never a key

    @classmethod
    def open(
        cls, runs_dir: str | Path, run: str, name: str, config: dict[str, Any], inputs: list[str] = ()
    ) -> Stage:
        root = run_dir(Path(runs_dir).resolve(), run)  # workers run elsewhere: absolute paths
        stage = cls(root / name, name, config, {i: root / i for i in inputs})
        stage.dir.mkdir(parents=True, exist_ok=True)
        return stage

    def input_manifest(self, name: str) -> dict[str, Any]:
        return read_manifest(self.inputs[name])

    def _input_hashes(self) -> dict[str, dict[str, str]]:
        out = {}
        for name, d in self.inputs.items():
            read_manifest(d)  # raises a clear error if the input stage is missing
            out[name] = {"manifest": str(d / MANIFEST), "sha256": sha256_file(d / MANIFEST)}
        return out

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_of(self.config)

    def fingerprint_of(self, config: dict[str, Any]) -> str:
        """The fingerprint this stage would have with ``config`` (same inputs, same version)."""
        return sha256_json({"config": config, "inputs": self._input_hashes(), "version": __version__})

    def is_current(self) -> bool:
        """True when a finished manifest matches this config and inputs and outputs are intact."""
        path = self.dir / MANIFEST
        if not path.exists():
            return False
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        if manifest.get("fingerprint") != self.fingerprint:
            return False
        for rel, meta in manifest.get("outputs", {}).items():
            f = self.dir / rel
            if not f.exists() or f.stat().st_size != meta["bytes"]:
                log.info("stage %s: output %s missing or changed; re-running", self.name, rel)
                return False
        return True

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def invalidate(self) -> None:
        """Remove the manifest first, so a crash during re-run never looks finished."""
        (self.dir / MANIFEST).unlink(missing_ok=True)

    def finish(
        self, outputs: list[str], metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Hash the outputs and write the manifest (last, atomically)."""
        files = {}
        for rel in sorted(set(outputs)):
            f = self.dir / rel
            if not f.is_file():
                raise FileNotFoundError(f"stage {self.name}: declared output {f} was not written")
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": self._input_hashes(),
            "outputs": files,
            "metrics": metrics or {},
            "started_at": _iso(self.started_at),
            "ended_at": _iso(time.time()),
            "elapsed_s": round(time.time() - self.started_at, 3),
            "steelworks_version": __version__,
            **(extra or {}),
        }
        atomic_write_json(self.dir / MANIFEST, manifest)
        return manifest


def list_outputs(directory: Path, under: str = "") -> list[str]:
    """Every file below ``directory/under`` as paths relative to ``directory`` (no manifests)."""
    base = directory / under if under else directory
    return sorted(
        str(p.relative_to(directory))
        for p in base.rglob("*")
        # Not outputs: temporaries, and lock files (checkpoint.run_lock: they hold a pid).
        if p.is_file() and p.name != MANIFEST and not p.name.endswith((".tmp", ".lock"))
    )


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
