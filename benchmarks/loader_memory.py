"""Resident memory of the packed loader from 1M to 1B sequences: the computed order
(``train/data.EpochOrder``, a keyed Feistel permutation) against the stored one it replaced
(``np.random.default_rng(...).permutation(n)``, 8 bytes per sequence per rank).

Each point runs in its own process: a shard set of ``n`` sequences (2 tokens each, uint16, a
sparse file of zeros: 4 GB at 1B that takes no disk), then the loader is built (which verifies
the shard's sha256, reading the file once) and takes 100 steps, a second append included.
Reported: the process's peak anonymous resident memory (RssAnon, sampled every 5 ms) above
what it had after its imports. File-backed pages of the memory-mapped shard are left out:
they are page cache, bounded by the rows read (readahead around each), not by the corpus.

    python benchmarks/loader_memory.py                     # 1M, 10M, 100M, 1B; stored up to 100M
    python benchmarks/loader_memory.py --sizes 1e6,1e7 --stored-max 1e7
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SEQ_LEN = 2


def _zeros_sha256(nbytes: int) -> str:
    h, chunk = hashlib.sha256(), bytes(64 << 20)
    while nbytes > 0:
        h.update(chunk[: min(nbytes, len(chunk))])
        nbytes -= len(chunk)
    return h.hexdigest()


def make_set(directory: Path, n: int) -> None:
    from steelworks.data.shards import ShardIndex, ShardInfo

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "shard_00000.bin"
    nbytes = n * SEQ_LEN * 2
    with open(path, "wb") as f:
        f.truncate(nbytes)  # sparse: reads as zeros, takes no disk
    info = ShardInfo(path.name, n, _zeros_sha256(nbytes))
    ShardIndex(SEQ_LEN, "uint16", 1000, 0, "pretrain", [info]).save(directory)


def _anon_mib() -> float:
    """Anonymous resident memory (RssAnon): what the process itself allocated. File-backed
    pages of the memory-mapped shards (page cache, shared, reclaimable, and bounded by how
    many rows were read, not by the corpus) are left out."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _Peak:
    """Peak RssAnon, sampled every 5 ms in a thread."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = _anon_mib(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _anon_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, _anon_mib())


def child(n: int, impl: str, work: Path) -> dict:
    import numpy as np

    from steelworks.train import data as loader_mod

    if impl == "stored":  # the order as the loader kept it before: one int64 array per rank
        def stored(self):
            order = np.random.default_rng([self.seed, self.epoch]).permutation(
                self.appends[0]["known"] if self.appends else len(self))
            bounds = [a["known"] for a in self.appends[1:]] + [len(self)]
            for k, (a, end) in enumerate(zip(self.appends, bounds), start=1):
                rest = np.concatenate([order[a["cursor"]:], np.arange(a["known"], end)])
                order = np.concatenate([order[:a["cursor"]],
                                        np.random.default_rng([self.seed, self.epoch, k]).permutation(rest)])
            return order

        loader_mod.PackedLoader._epoch_order = stored
    base = _anon_mib()
    peak = _Peak()
    t0 = time.perf_counter()
    loader = loader_mod.PackedLoader(work / "set", rank=0, world=8, micro_batch=4, grad_accum=1, seed=0)
    for _ in range(50):
        loader.next_step()
    state = loader.state_dict()
    # resume with the same shards plus an append (a second set): the order is rebuilt
    loader = loader_mod.PackedLoader([work / "set", work / "more"], rank=0, world=8, micro_batch=4,
                                     grad_accum=1, seed=0)
    loader.load_state_dict(state)
    for _ in range(50):
        loader.next_step()
    return {"n": n, "impl": impl, "peak_rss_above_imports_mib": peak.stop() - base,
            "seconds": time.perf_counter() - t0,
            "peak_rss_total_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e6,1e7,1e8,1e9")
    ap.add_argument("--stored-max", type=float, default=1e8,
                    help="largest size for the stored order (1B needs 8+ GB per rank)")
    ap.add_argument("--child", nargs=3, metavar=("N", "IMPL", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        n, impl, work = int(float(args.child[0])), args.child[1], Path(args.child[2])
        print("RESULT " + json.dumps(child(n, impl, work)), flush=True)
        return
    rows = []
    for n in (int(float(x)) for x in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(dir=Path(__file__).parent / ".work" if
                                         (Path(__file__).parent / ".work").exists() else None) as tmp:
            work = Path(tmp)
            make_set(work / "set", n)
            make_set(work / "more", max(1, n // 10))
            for impl in ("computed", "stored"):
                if impl == "stored" and n > args.stored_max:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", str(n), impl, str(work)],
                                     capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(out.stderr[-3000:])
                r = json.loads(line[7:])
                rows.append(r)
                print(f"{n:>13,} sequences  {impl:<8}  peak RSS above imports "
                      f"{r['peak_rss_above_imports_mib']:8.1f} MiB  ({r['seconds']:.1f} s)", flush=True)
    print(f"\nmachine: {platform.node()} {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; "
          f"`python benchmarks/loader_memory.py --sizes {args.sizes}`")
    print("\n| sequences | computed order (MiB) | stored order (MiB) |\n|---:|---:|---:|")
    for n in sorted({r["n"] for r in rows}):
        c = next(r for r in rows if r["n"] == n and r["impl"] == "computed")
        s = next((r for r in rows if r["n"] == n and r["impl"] == "stored"), None)
        print(f"| {n:,} | {c['peak_rss_above_imports_mib']:.1f} | "
              f"{s['peak_rss_above_imports_mib']:.1f} |" if s else
              f"| {n:,} | {c['peak_rss_above_imports_mib']:.1f} | (not run: {8 * n / 2**30:.1f} GiB "
              "for the array alone) |")


if __name__ == "__main__":
    main()
