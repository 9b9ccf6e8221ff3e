"""Run directories on object storage: ``runs_dir`` as ``s3://bucket/prefix`` or ``gs://...``.

On a cluster of several nodes a local ``runs_dir`` splits a run across disks: rank k's
checkpoint shard lands on node k, and a stage on one node cannot see what another wrote.
With a URI, the bucket holds the run and every node reads and writes it through pyarrow's
filesystems (``pyarrow.fs``: S3, GCS; no client of our own). The endpoint and credentials
come from the usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, an instance
role...), as with any AWS tool.

How it is used (docs/scaling.md has the picture):

- Each process works in a local mirror of the run (``mirror_root``) and the bucket is the
  truth: a stage pulls its inputs' outputs from the bucket before it starts, and pushes its
  own outputs, then its manifest, when it finishes (``rundir.Stage``).
- Ray Data workers write their shards straight into the bucket, and Ray Train gets the bucket
  as its ``storage_path``.
- Each rank uploads its own checkpoint shard; rank 0 uploads the checkpoint's ``meta.json``
  last (``train/checkpoint.py``).

Atomicity: object stores have no rename, but a PUT is atomic: an object appears whole when
its upload completes (a multipart upload only at CompleteMultipartUpload) or not at all, and
S3 and GCS are strongly read-after-write consistent. So "write a temporary file, then rename"
becomes "upload the data objects, then upload one marker object last": a stage's
``manifest.json``, a checkpoint's ``meta.json``. A reader trusts a directory only when its
marker exists, exactly as it trusts a local directory only after the rename. A crash before
the marker leaves objects that nothing trusts; the next run overwrites them.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SCHEMES = ("s3://", "gs://", "gcs://")
# Bytes per read or write call when copying a file: pyarrow's S3 input file issues one ranged
# GET per read, so its 1 MiB default means a thousand requests per GB (and servers that re-read
# the object per range, as moto's does, go quadratic).
CHUNK = 32 << 20


def is_uri(path: str | Path | None) -> bool:
    """True for an object-store URI (``s3://``, ``gs://``), False for a local path."""
    return isinstance(path, str) and path.startswith(SCHEMES)


@functools.lru_cache(maxsize=8)
def _filesystem(scheme_and_bucket: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_bucket)
    return fs


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it: ``bucket/key``) for ``uri``. One filesystem per
    bucket and process: S3FileSystem keeps a connection pool."""
    if not is_uri(uri):
        raise ValueError(f"{uri!r} is not an object-store URI (s3://bucket/prefix or gs://...)")
    scheme, rest = uri.split("://", 1)
    bucket = rest.split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (s3://bucket/prefix)")
    return _filesystem(f"{scheme}://{bucket}"), rest.rstrip("/")


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])


def location(root: str | Path, *parts: str) -> str:
    """``root/parts...`` for a path or a URI alike (``runs_dir`` may be either)."""
    return join(str(root), *parts) if is_uri(str(root)) else str(Path(root, *parts))


def _mirrors() -> Path:
    return Path(os.environ.get("STEELWORKS_CACHE") or Path.home() / ".cache" / "steelworks") / "runs"


def mirror_root(uri: str) -> Path:
    """The local working copy of a run directory in ``uri``: ``$STEELWORKS_CACHE`` (default
    ``~/.cache/steelworks``)/``runs/<scheme>/<bucket>/<prefix>``. Only a cache: deleting it
    loses nothing that a stage has finished, and the next run pulls what it needs again."""
    scheme, rest = uri.split("://", 1)
    return _mirrors() / scheme / rest.strip("/")


def uri_of(path: str | Path) -> str | None:
    """The object a path in this process's mirror stands for (``mirror_root`` reversed), or
    None for any other path. The driver hands Ray Data workers URIs this way: a worker on
    another node has no mirror of its own to find the file in."""
    try:
        rel = Path(path).resolve().relative_to(_mirrors().resolve())
    except ValueError:
        return None
    scheme, *rest = rel.parts
    return f"{scheme}://{'/'.join(rest)}" if rest else None


def dataset_paths(paths: Iterable[str | Path]) -> tuple[list[str], pafs.FileSystem | None]:
    """Paths for ``ray.data.read_parquet(paths, filesystem=fs)``: the objects in the bucket
    when the files are mirrored ones (read tasks may run on any node), else the paths."""
    paths = [str(p) for p in paths]
    uris = [uri_of(p) for p in paths]
    if not uris or any(u is None for u in uris):
        return paths, None
    fs = filesystem(uris[0])[0]
    return [filesystem(u)[1] for u in uris], fs


def local_dir(location: str | Path, marker: str) -> Path:
    """A directory a worker reads (a tokenizer, on a Ray Data worker), given as a path or as
    a URI (``uri_of``): a URI is fetched into this node's mirror unless its ``marker`` file
    is there already; the marker is uploaded last, so its presence means the rest is too."""
    if not is_uri(str(location)):
        return Path(location)
    local = mirror_root(str(location))
    if not (local / marker).is_file() and not Remote(str(location)).mirror(local, marker):
        raise FileNotFoundError(f"{location}/{marker} does not exist: the directory was not uploaded")
    return local


class Remote:
    """One directory in a bucket: the few operations the run directory needs."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/")
        self.fs, self.root = filesystem(self.uri)

    def __repr__(self) -> str:
        return f"Remote({self.uri!r})"

    def child(self, rel: str) -> Remote:
        return Remote(join(self.uri, rel))

    def _path(self, rel: str = "") -> str:
        return f"{self.root}/{rel.strip('/')}" if rel else self.root

    def size(self, rel: str) -> int | None:
        """The object's size, or None when there is none."""
        info = self.fs.get_file_info(self._path(rel))
        return info.size if info.type == pafs.FileType.File else None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def read_bytes(self, rel: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{join(self.uri, rel)} does not exist") from None

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT: readers see the old object or the new one, never part of one."""
        with self.fs.open_output_stream(self._path(rel)) as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())

    def upload(self, local: str | Path, rel: str) -> None:
        """Copy a local file to ``rel`` (streamed: shards and checkpoints run to GBs)."""
        pafs.copy_files(str(local), self._path(rel), destination_filesystem=self.fs,
                        chunk_size=CHUNK)

    def download(self, rel: str, local: str | Path) -> Path:
        """Copy ``rel`` to a local file, atomically: a temporary file beside it, then a
        rename, so two processes fetching the same file (ranks on one node) never see half."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
        os.close(fd)
        try:
            pafs.copy_files(self._path(rel), tmp, source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem(), chunk_size=CHUNK)
            os.replace(tmp, local)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return local

    def listing(self, rel: str = "") -> dict[str, int]:
        """{path relative to this directory: size} of every object below ``rel``."""
        selector = pafs.FileSelector(self._path(rel), recursive=True, allow_not_found=True)
        prefix = self.root + "/"
        return {i.path[len(prefix):]: i.size for i in self.fs.get_file_info(selector)
                if i.type == pafs.FileType.File}

    def dirs(self, rel: str = "") -> list[str]:
        """The names of the directories right below ``rel``."""
        selector = pafs.FileSelector(self._path(rel), recursive=False, allow_not_found=True)
        return sorted(Path(i.path).name for i in self.fs.get_file_info(selector)
                      if i.type == pafs.FileType.Directory)

    def delete(self, rel: str) -> None:
        """Delete an object, or everything below a directory; nothing there is no error."""
        path = self._path(rel)
        info = self.fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            self.fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            self.fs.delete_dir(path)

    def push(self, local_dir: str | Path, files: Iterable[str], last: str | None = None) -> None:
        """Upload ``files`` (relative to ``local_dir``), then ``last`` (the marker), so the
        marker's presence means every file before it is there."""
        local_dir = Path(local_dir)
        for rel in files:
            if rel != last:
                self.upload(local_dir / rel, rel)
        if last is not None:
            self.upload(local_dir / last, last)

    def pull(self, local_dir: str | Path, files: dict[str, int]) -> list[str]:
        """Download each of ``files`` ({relative path: size}) whose local copy is missing or
        of another size; -> those downloaded."""
        local_dir, fetched = Path(local_dir), []
        for rel, size in files.items():
            f = local_dir / rel
            if not f.is_file() or f.stat().st_size != size:
                self.download(rel, f)
                fetched.append(rel)
        return fetched

    def mirror(self, local_dir: str | Path, marker: str) -> bool:
        """Make ``local_dir`` a copy of this directory, whose ``marker`` object is written
        last (a checkpoint's ``meta.json``); False when there is no marker (not complete).
        A local marker equal to the bucket's says the copy was completed against it: then
        only missing files are fetched; otherwise everything is, and the marker last."""
        try:
            raw = self.read_bytes(marker)
        except FileNotFoundError:
            return False
        local_dir = Path(local_dir)
        local_marker = local_dir / marker
        same = local_marker.is_file() and local_marker.read_bytes() == raw
        files = {rel: size for rel, size in self.listing().items() if rel != marker}
        if same:
            self.pull(local_dir, files)
            return True
        local_marker.unlink(missing_ok=True)
        for rel in files:
            self.download(rel, local_dir / rel)
        self.download(marker, local_marker)
        return True

