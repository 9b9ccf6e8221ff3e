"""Run directories, stage manifests, and the cache key that decides when a stage re-runs.

Every stage writes ``runs/<run>/<stage>/`` and finishes by writing ``manifest.json`` there:
the resolved config, what it read (input stages, files), every output file with its sha256
and size, metrics, timing and the package version.  The manifest is written last and
atomically, so a directory without one is an unfinished stage.

A stage is skipped ("up to date") when its manifest exists, all its outputs are present with
the recorded sizes, and its fingerprint is unchanged.  The fingerprint hashes what the
stage's work depends on, by content rather than by timestamps:

- its config (secrets redacted);
- ``reads``: the small files it reads besides its config (the data stage's recipe YAML and
  the flagged-word lists the recipes name, a pretrained tokenizer, a benchmark directory),
  by the sha256 of their contents and their names, not where they are: an edit re-runs the
  stage, a ``touch`` does not, and a Ray job running from an unpacked copy of the
  repository keeps the key of the checkout it came from;
- ``raw_inputs``: the corpus files of the data stage, by path, size and ``mtime_ns``, not by
  content: inputs run to terabytes, and hashing them at every pipeline start would cost
  longer than many stages.  An edit through any ordinary tool changes the mtime; a file
  rewritten keeping both its size and its mtime (``cp -p``/``rsync -t`` of another version,
  or a clock set back) is not noticed: re-run the stage with ``--force`` then;
- the content of its input stages' outputs: each input manifest's ``content_sha256``, the
  hash of its outputs' sha256 and of the fields it hands downstream (``extra``: the data
  stage's ``ratios``, ``exam``), leaving out timestamps, timings, metrics and the outputs
  marked as ``reports`` (histograms, logs: nothing downstream reads them).  A ``--force``
  re-run that reproduces its outputs byte for byte therefore leaves the stages after it up
  to date, while a changed output re-runs them;
- the package version, as a stand-in for the code.

``runs_dir`` may also be an object-store URI (``s3://bucket/prefix``; platform/storage.py).
The bucket then holds the run and the stage works in a local mirror of it: opening a stage
pulls its input stages' manifests and outputs from the bucket, the cache check reads the
stage's manifest and output sizes from the bucket, ``invalidate`` deletes the manifest there
first, and ``finish`` uploads the outputs and then the manifest, last, as the commit marker.

The key is taken once per ``Stage``, on first use: the pipeline takes it when it opens a
stage, before the work, so the manifest records what the work started from even when a read
file is edited while the stage runs (the next run then sees the edit).  ``is_current`` logs
which part changed.  ``--force`` re-runs a stage whatever its key.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steelworks import __version__
from steelworks.core.atomic import (
    atomic_write_json,
    atomic_write_text,
    sha256_file,
    sha256_json,
)
from steelworks.core.storage import Remote, is_uri, join, mirror_root

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


def stage_path(location: str | Path) -> Path:
    """A file or directory inside a finished stage (``<run>/sft/hf``), given as a path, or as
    a URI when the run is in a bucket (``storage.uri_of``): then its stage is fetched into
    this node's mirror first. For Ray actors that may run on any node (eval replicas, the
    DPO reference scorers)."""
    if not is_uri(str(location)):
        return Path(location)
    uri, rel = str(location).rstrip("/"), []
    for _ in range(4):  # up from the location to the stage directory, which has a manifest
        remote = Remote(uri)
        if remote.exists(MANIFEST):
            local = mirror_root(uri)
            pull_stage(remote, local)
            return local.joinpath(*reversed(rel))
        uri, name = uri.rsplit("/", 1)
        rel.append(name)
    raise StageInputError(f"{location} is not inside a finished stage (no {MANIFEST} above it)")


class StageInputError(RuntimeError):
    """A stage's input stage has not completed (no manifest)."""


def run_dir(runs_dir: str | Path, run: str) -> Path:
    """The run's local directory: ``runs_dir/run``, or for a URI its local mirror."""
    if is_uri(runs_dir):
        return mirror_root(join(str(runs_dir), run))
    return Path(runs_dir) / run


def pull_stage(remote: Remote, local_dir: Path) -> dict[str, Any]:
    """Bring a finished stage from the bucket into its local mirror: every output whose local
    copy is missing or differs from the manifest, then the manifest, last (a local directory
    with a manifest is complete here too, as everywhere). A local manifest equal to the
    bucket's says the mirror was completed against it: then sizes are checked, not hashes
    (shards run to terabytes). Every fetched file's sha256 is checked."""
    try:
        raw = remote.read_bytes(MANIFEST)
    except FileNotFoundError:
        (local_dir / MANIFEST).unlink(missing_ok=True)
        raise StageInputError(f"{remote.uri}/{MANIFEST} does not exist: stage "
                              f"{local_dir.name!r} has not completed; run it first") from None
    manifest = json.loads(raw)
    outputs = manifest.get("outputs", {})
    local_manifest = local_dir / MANIFEST
    same = local_manifest.is_file() and local_manifest.read_bytes() == raw

    def stale(rel: str, meta: dict[str, Any]) -> bool:
        f = local_dir / rel
        if not f.is_file() or f.stat().st_size != meta["bytes"]:
            return True
        return not same and sha256_file(f) != meta["sha256"]

    fetch = {rel: meta["bytes"] for rel, meta in outputs.items() if stale(rel, meta)}
    if not fetch and same:
        return manifest
    local_manifest.unlink(missing_ok=True)  # incomplete until the fetches are done
    # Each fetch replaces its file atomically: another process of this node (a second rank)
    # reading the same mirror sees the old file or the new one.
    for rel in fetch:
        remote.download(rel, local_dir / rel)
        if sha256_file(local_dir / rel) != outputs[rel]["sha256"]:
            raise RuntimeError(f"{remote.uri}/{rel} does not match the sha256 in its manifest: "
                               "the bucket was changed outside steelworks; re-run the stage")
    local_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(local_manifest, raw.decode("utf-8"))
    return manifest


def read_manifest(stage_dir: str | Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        raise StageInputError(
            f"{path} does not exist: stage {Path(stage_dir).name!r} has not completed; run it first"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def _files_below(directory: Path) -> list[Path]:
    # Hidden files (editor swaps, macOS "._x") are not content, as formats.expand_paths says.
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))


def _content_hash(path: Path) -> str:
    if path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return sha256_json({str(f.relative_to(path)): sha256_file(f) for f in _files_below(path)})
    raise FileNotFoundError(f"{path} does not exist (a stage reads it)")


def content_hashes(paths: Iterable[str | Path]) -> dict[str, str]:
    """Path -> sha256 of the file's content, or for a directory of its files' names (below it)
    and contents; in the given order. Missing paths are a FileNotFoundError naming them."""
    return {str(p): _content_hash(Path(p)) for p in paths}


def _named(hashes: dict[str, str]) -> list[list[str]]:
    # The name and content of each read, not its directory: see the module docstring.
    return [[Path(p).name, h] for p, h in hashes.items()]


def content_key(paths: Iterable[str | Path]) -> str:
    """One digest of what ``paths`` (files or directories) hold: their contents and names,
    independent of where they are; the same digest a stage's fingerprint takes of its reads."""
    return sha256_json(_named(content_hashes(paths)))


def stat_key(paths: Iterable[str | Path]) -> dict[str, Any]:
    """Raw input files by path, size and mtime_ns (a directory: every file below it): their
    count, total bytes and a digest. Not their content: see the module docstring."""
    entries: list[list[Any]] = []
    for p in map(Path, paths):
        for f in _files_below(p) if p.is_dir() else [p]:
            st = f.stat()  # FileNotFoundError names the file
            entries.append([str(f), st.st_size, st.st_mtime_ns])
    return {"files": len(entries), "bytes": sum(e[1] for e in entries), "sha256": sha256_json(entries)}


def content_sha256(manifest: dict[str, Any]) -> str:
    """What a finished stage hands downstream, hashed: its non-report outputs' sha256 and its
    ``extra`` fields. Manifests written before this key existed: their outputs alone."""
    if "content_sha256" in manifest:
        return manifest["content_sha256"]
    return sha256_json({"outputs": {k: v["sha256"] for k, v in manifest.get("outputs", {}).items()}})


@dataclass
class Stage:
    """One stage's output directory, its cache check and its manifest writer."""

    dir: Path
    name: str
    config: dict[str, Any]
    inputs: dict[str, Path] = field(default_factory=dict)  # input stage name -> its directory
    reads: list[Path] = field(default_factory=list)  # small files/dirs, keyed by content
    raw_inputs: list[Path] = field(default_factory=list)  # corpus files, keyed by size + mtime
    started_at: float = field(default_factory=time.time)
    # runs_dir is a URI: this stage's directory in the bucket, and its input stages'.
    remote: Remote | None = None
    input_remotes: dict[str, Remote] = field(default_factory=dict)
    _key: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.config = redact_secrets(self.config)  # whatever the caller passed: never a key

    @classmethod
    def open(
        cls, runs_dir: str | Path, run: str, name: str, config: dict[str, Any],
        inputs: Iterable[str] = (), reads: Iterable[str | Path] = (),
        raw_inputs: Iterable[str | Path] = (),
    ) -> Stage:
        """``inputs``: the stages it reads; ``reads``: other files or directories it reads,
        small enough to hash; ``raw_inputs``: corpus files, too big to hash (module docstring)."""
        inputs = list(inputs)
        remote = is_uri(runs_dir)
        # workers run elsewhere: absolute paths
        root = run_dir(runs_dir if remote else Path(runs_dir).resolve(), run)
        stage = cls(root / name, name, config, {i: root / i for i in inputs},
                    [Path(p) for p in reads], [Path(p) for p in raw_inputs])
        if remote:
            run_uri = join(str(runs_dir), run)
            stage.remote = Remote(join(run_uri, name))
            stage.input_remotes = {i: Remote(join(run_uri, i)) for i in inputs}
        stage.dir.mkdir(parents=True, exist_ok=True)
        return stage

    @property
    def location(self) -> str:
        """Where the stage lives, for messages: its URI, or its directory."""
        return self.remote.uri if self.remote is not None else str(self.dir)

    def input_manifest(self, name: str) -> dict[str, Any]:
        """An input stage's manifest; in a bucket, its outputs are fetched into the mirror."""
        if name in self.input_remotes:
            return pull_stage(self.input_remotes[name], self.inputs[name])
        return read_manifest(self.inputs[name])

    def _key_parts(self) -> dict[str, Any]:
        """Everything the fingerprint covers but the config, taken once (module docstring)."""
        if self._key is None:
            inputs = {}
            for name, d in self.inputs.items():
                # input_manifest raises a clear error if the input stage has not completed.
                where = f"{self.input_remotes[name].uri}/{MANIFEST}" if name in self.input_remotes \
                    else str(d / MANIFEST)
                inputs[name] = {"manifest": where,
                                "content_sha256": content_sha256(self.input_manifest(name))}
            self._key = {"inputs": inputs, "reads": content_hashes(self.reads),
                         "raw_inputs": stat_key(self.raw_inputs), "version": __version__}
        return self._key

    @property
    def input_hashes(self) -> dict[str, str]:
        """{input stage: content_sha256 of its outputs} (what the fingerprint covers of it)."""
        return {n: i["content_sha256"] for n, i in self._key_parts()["inputs"].items()}

    @property
    def fingerprint(self) -> str:
        return self.fingerprint_of(self.config)

    def fingerprint_of(self, config: dict[str, Any]) -> str:
        """The fingerprint this stage would have with ``config`` (same reads and inputs)."""
        return _fingerprint(config, self._key_parts())

    def is_current(self) -> bool:
        """True when a finished manifest matches this config, reads and inputs, and the outputs
        are intact. Takes the key (first), also when there is no manifest to compare it with."""
        fingerprint = self.fingerprint
        if self.remote is not None:
            return self._is_current_remote(fingerprint)
        path = self.dir / MANIFEST
        if not path.exists():
            return False
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return False
        if manifest.get("fingerprint") != fingerprint:
            log.info("stage %s: %s changed since its last run; re-running", self.name,
                     ", ".join(self._changed(manifest)) or "the cache key format")
            return False
        for rel, meta in manifest.get("outputs", {}).items():
            f = self.dir / rel
            if not f.exists() or f.stat().st_size != meta["bytes"]:
                log.info("stage %s: output %s missing or changed; re-running", self.name, rel)
                return False
        return True

    def _is_current_remote(self, fingerprint: str) -> bool:
        """``is_current`` against the bucket (the truth); a current stage's outputs are then
        pulled into the local mirror for the stages after it."""
        try:
            manifest = self.remote.read_json(MANIFEST)
        except (FileNotFoundError, json.JSONDecodeError):
            return False
        if manifest.get("fingerprint") != fingerprint:
            log.info("stage %s: %s changed since its last run; re-running", self.name,
                     ", ".join(self._changed(manifest)) or "the cache key format")
            return False
        sizes = self.remote.listing()
        for rel, meta in manifest.get("outputs", {}).items():
            if sizes.get(rel) != meta["bytes"]:
                log.info("stage %s: output %s/%s missing or changed; re-running", self.name,
                         self.remote.uri, rel)
                return False
        pull_stage(self.remote, self.dir)
        return True

    def _changed(self, manifest: dict[str, Any]) -> list[str]:
        """What differs from a manifest's key, named for the log."""
        parts, out = self._key_parts(), []
        if sha256_json(manifest.get("config")) != sha256_json(self.config):  # tuples vs lists
            out.append("the config")
        old = manifest.get("reads", {})
        if _named(old) != _named(parts["reads"]):
            out += [f"{p} (read)" for p, h in parts["reads"].items() if old.get(p) != h] or ["the files read"]
        if manifest.get("raw_inputs", {}).get("sha256") != parts["raw_inputs"]["sha256"]:
            out.append("raw input files (size or mtime)")
        old_in = manifest.get("inputs", {})
        out += [f"the outputs of stage {n!r}" for n, i in parts["inputs"].items()
                if old_in.get(n, {}).get("content_sha256") != i["content_sha256"]]
        if manifest.get("steelworks_version") != parts["version"]:
            out.append("the steelworks version")
        return out

    def path(self, rel: str) -> Path:
        p = self.dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def invalidate(self) -> None:
        """Remove the manifest first, so a crash during re-run never looks finished."""
        if self.remote is not None:
            self.remote.delete(MANIFEST)
        (self.dir / MANIFEST).unlink(missing_ok=True)

    def finish(
        self, outputs: list[str], metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None, reports: Iterable[str] = (),
        in_bucket: Iterable[str] = (),
    ) -> dict[str, Any]:
        """Hash the outputs and write the manifest (last, atomically). ``extra``: fields for
        the stages downstream (part of ``content_sha256``); ``reports``: those of ``outputs``
        meant for people (histograms, logs), checked like the others but not part of it;
        ``in_bucket``: outputs just fetched from the run's bucket, not uploaded again."""
        reports = sorted(set(reports))
        if unknown := set(reports) - set(outputs):
            raise ValueError(f"stage {self.name}: reports {sorted(unknown)} are not among its outputs")
        files = {}
        for rel in sorted(set(outputs)):
            f = self.dir / rel
            if not f.is_file():
                raise FileNotFoundError(f"stage {self.name}: declared output {f} was not written")
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        parts = self._key_parts()
        content = sha256_json({"outputs": {k: v["sha256"] for k, v in files.items() if k not in reports},
                               "extra": extra or {}})
        manifest = {
            "stage": self.name,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "inputs": parts["inputs"],
            "reads": parts["reads"],
            "raw_inputs": parts["raw_inputs"],
            "outputs": files,
            "reports": reports,
            "content_sha256": content,
            "metrics": metrics or {},
            "started_at": _iso(self.started_at),
            "ended_at": _iso(time.time()),
            "elapsed_s": round(time.time() - self.started_at, 3),
            "steelworks_version": __version__,
            **(extra or {}),
        }
        atomic_write_json(self.dir / MANIFEST, manifest)
        if self.remote is not None:  # the outputs, then the manifest: the commit marker
            skip = set(in_bucket)
            self.remote.push(self.dir, [*(f for f in files if f not in skip), MANIFEST], last=MANIFEST)
        return manifest


def _fingerprint(config: dict[str, Any], parts: dict[str, Any]) -> str:
    return sha256_json({"config": config, "reads": _named(parts["reads"]),
                        "raw_inputs": parts["raw_inputs"]["sha256"],
                        "inputs": {n: i["content_sha256"] for n, i in parts["inputs"].items()},
                        "version": parts["version"]})


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
