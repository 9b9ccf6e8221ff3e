"""The continuous-batching engine: batched rows compute what they compute alone, requests join
and leave mid-generation, cancel frees slots, the queue is bounded, logprobs are the model's."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from steelworks.inference.sampling import SamplingParams
from steelworks.inference.scheduler import QueueFullError

# Token lengths 2, 3, 4, 10, 12, 13, 18, 38 with the fixture's tokenizer.
TEXTS = ["北京是中国的首都。", "你好", "答案是A。以下是中国关于地理考试的单项选择题，请选出其中的正确答案。",
         "Hello world! Hello world! Hello world!", "上海是一座大城市。你好，世界！" * 2,
         "The quick brown fox jumps over the lazy dog. Hello world!", "The cat sat on the mat.",
         "今天天气很好，我们去公园散步吧。"]






@contextmanager
def throttled(model: torch.nn.Module, seconds: float = 0.002) -> Iterator[None]:
    """Slow every forward pass down, so "mid-generation" does not depend on machine load."""
    handle = model.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


class Gate:
    """Parks the scheduler thread before chosen forward passes of the model (counted from 1
    when the gate is made), so a test acts between two steps whatever the machine's load."""

    def __init__(self, model: torch.nn.Module, *at: int) -> None:
        self.at, self.calls = set(at), 0
        self.parked, self.go = threading.Event(), threading.Event()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.calls += 1
        if self.calls in self.at:
            self.go.clear()
            self.parked.set()
            self.go.wait(20)

    def wait_parked(self) -> None:
        assert self.parked.wait(20), "the scheduler never reached the gate"
        self.parked.clear()

    def release(self) -> None:
        self.go.set()

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *_) -> None:
        self.go.set()
        self.handle.remove()


def wait_for(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_one_request_matches_transformers_generate(make_engine):
    engine = make_engine()
    for text in TEXTS:
        ids = engine.encode(text)
        res = engine.generate(ids, greedy(24))
        ref = engine.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                                    eos_token_id=sorted(engine.stop_token_ids))
        assert res.token_ids == ref[0, len(ids):].tolist()
    assert len({len(engine.encode(t)) for t in TEXTS}) == len(TEXTS)  # different lengths


def test_concurrent_requests_match_their_solo_runs(make_engine):
    engine = make_engine(max_batch_size=8)
    params = [greedy(8), greedy(40), greedy(17, repetition_penalty=1.3), greedy(30, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0.8, top_k=50, seed=7),
              SamplingParams(max_tokens=33, temperature=1.0, top_p=0.9, seed=11),
              greedy(12, stop=["。"]), greedy(50, ignore_eos=True)]
    prompts = [engine.encode(t) for t in TEXTS]
    solo = [engine.generate(ids, p) for ids, p in zip(prompts, params, strict=True)]
    assert engine.stats()["batch_size_peak"] == 1

    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        barrier.wait()
        results[i] = engine.generate(prompts[i], params[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    with Gate(engine.model, 1) as gate:  # hold the first prefill until all have queued
        for t in threads:
            t.start()
        gate.wait_parked()
        wait_for(lambda: sum(engine.stats()[k] for k in ("waiting", "running")) == len(prompts))
        gate.release()
        for t in threads:
            t.join(60)
    for got, want in zip(results, solo, strict=True):
        assert got.token_ids == want.token_ids and got.text == want.text
        assert got.finish_reason == want.finish_reason
    assert engine.stats()["batch_size_peak"] > 1  # they really shared decode steps
    wait_for(lambda: engine.stats()["running"] == 0)


def test_requests_join_mid_generation(make_engine):
    engine = make_engine()
    long_ids, short_ids, longer_ids = (engine.encode(TEXTS[i]) for i in (5, 1, 7))
    assert len(short_ids) < len(long_ids) < len(longer_ids)
    solo_a = engine.generate(long_ids, greedy(150, ignore_eos=True))
    solo_b = engine.generate(short_ids, greedy(20))
    solo_c = engine.generate(longer_ids, greedy(20, repetition_penalty=1.2))
    with Gate(engine.model, 11) as gate:  # after A's prefill and 9 steps: 10 tokens
        a = engine.stream(long_ids, greedy(150, ignore_eos=True))
        gate.wait_parked()
        # B pads on the left to the batch's width; C is wider than the batch, so the batch pads.
        b = engine.stream(short_ids, greedy(20))
        c = engine.stream(longer_ids, greedy(20, repetition_penalty=1.2))
        gate.release()
        b_out, c_out = list(b), list(c)
        # Rows decode in lockstep: B and C are done 20 steps after joining, A is not.
        wait_for(lambda: engine.stats()["running"] == 1)
        a_out = list(a)
    assert a.result.token_ids == solo_a.token_ids and a.result.finish_reason == "length"
    assert "".join(a_out) == solo_a.text
    assert b.result.token_ids == solo_b.token_ids and "".join(b_out) == solo_b.text
    assert c.result.token_ids == solo_c.token_ids and "".join(c_out) == solo_c.text
    assert engine.stats()["batch_size_peak"] == 3


def test_cancel_frees_the_slot(make_engine):
    engine = make_engine(max_batch_size=2, max_queue=4)
    ids = [engine.encode(t) for t in TEXTS[:3]]
    solo_b = engine.generate(ids[1], greedy(200, ignore_eos=True))
    solo_c = engine.generate(ids[2], greedy(10))
    # Forward passes: 1 A's prefill (held while B and C queue), 2 A's step, 3 B's prefill,
    # 4 and 5 steps of A and B, 6 held: A is cancelled there.
    with Gate(engine.model, 1, 6) as gate:
        a = engine.stream(ids[0], greedy(300, ignore_eos=True))
        gate.wait_parked()
        b = engine.stream(ids[1], greedy(200, ignore_eos=True))
        c = engine.stream(ids[2], greedy(10))  # waits: the batch will hold A and B
        gate.release()
        gate.wait_parked()
        s = engine.stats()
        assert (s["running"], s["waiting"]) == (2, 1)
        a.cancel()  # mid-generation: it has decoded 4 tokens
        assert list(a) == [] and a.result.finish_reason == "cancelled"
        gate.release()
        assert list(c) and c.result.token_ids == solo_c.token_ids  # C took A's slot ...
        wait_for(lambda: engine.stats()["running"] == 1)  # ... and left while B decodes on
        list(b)
    assert b.result.token_ids == solo_b.token_ids
    wait_for(lambda: engine.stats()["running"] == engine.stats()["waiting"] == 0)


def test_queue_full_raises_and_recovers(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=1)
    ids = engine.encode(TEXTS[1])
    a = engine.stream(ids, greedy(400, ignore_eos=True))
    b = engine.stream(ids, greedy(400, ignore_eos=True))
    with pytest.raises(QueueFullError):
        engine.stream(ids, greedy(5))
    assert engine.stats()["rejected_total"] == 1
    b.cancel()  # a queued request leaves the queue ...
    a.cancel()  # ... and a running one its row
    assert a.result is None  # results appear as the consumer reads
    assert list(a) == list(b) == [] and b.result.finish_reason == "cancelled"
    wait_for(lambda: engine.stats()["running"] == engine.stats()["waiting"] == 0)
    assert engine.generate(ids, greedy(5)).completion_tokens == 5


def test_seeded_sampling_is_reproducible(make_engine):
    engine = make_engine()
    ids = engine.encode(TEXTS[1])

    def sample(seed: int) -> list[int]:
        p = SamplingParams(max_tokens=30, temperature=1.0, seed=seed, ignore_eos=True)
        return engine.generate(ids, p).token_ids

    first = sample(1)
    assert sample(1) == first and sample(2) != first
    # ... also when other rows, with their own generators, share the decode steps.
    others = [engine.stream(engine.encode(t), SamplingParams(max_tokens=40, seed=5, ignore_eos=True))
              for t in TEXTS[2:5]]
    assert sample(1) == first
    for s in others:
        list(s)


def direct_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over ``ids``: row i predicts token i + 1."""
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_generated_token_logprobs_are_the_models(make_engine):
    engine = make_engine()
    ids = engine.encode(TEXTS[3])
    other = engine.stream(engine.encode(TEXTS[7]), greedy(60, ignore_eos=True))  # a padded batch
    # The penalty changes which token is picked, never the reported (raw) logprobs.
    stream = engine.stream(ids, greedy(12, logprobs=4, repetition_penalty=1.5, ignore_eos=True))
    seen = 0
    for _ in stream:
        assert len(stream.token_logprobs) == len(stream.token_ids) >= seen  # incremental
        seen = len(stream.token_ids)
    list(other)
    r = stream.result
    assert len(r.token_logprobs) == len(r.top_logprobs) == len(r.token_ids) == 12
    lp = direct_logprobs(engine.model, ids + r.token_ids)
    for k, (tid, got, top) in enumerate(zip(r.token_ids, r.token_logprobs, r.top_logprobs,
                                            strict=True)):
        row = lp[len(ids) - 1 + k]
        assert got == pytest.approx(float(row[tid]), abs=1e-4)
        values, indices = row.topk(4)
        assert list(top) == indices.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    plain = engine.generate(ids, greedy(3, logprobs=0))
    assert plain.top_logprobs == [{}, {}, {}] and len(plain.token_logprobs) == 3
    assert engine.generate(ids, greedy(3)).token_logprobs is None


def test_prompt_logprobs(make_engine):
    engine = make_engine()
    ids = engine.encode(TEXTS[7])
    lp = direct_logprobs(engine.model, ids)
    got = engine.prompt_logprobs(ids, top=3)
    assert got.token_logprobs[0] is None and got.top_logprobs[0] is None
    assert len(got.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert got.token_logprobs[i] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4)
        assert list(got.top_logprobs[i]) == lp[i - 1].topk(3).indices.tolist()
    assert engine.prompt_logprobs(ids).top_logprobs[1:] == [{}] * (len(ids) - 1)
    with pytest.raises(ValueError):
        engine.prompt_logprobs([])


def test_stop_string_frees_the_row(make_engine):
    engine = make_engine()
    ids = engine.encode(TEXTS[1])
    full = engine.generate(ids, greedy(60, ignore_eos=True))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop
    with throttled(engine.model):
        res = engine.generate(ids, greedy(400, ignore_eos=True, stop=[stop]))
        wait_for(lambda: engine.stats()["running"] == 0)
    assert res.finish_reason == "stop" and res.text == full.text[: full.text.index(stop)]
    assert engine.stats()["generation_tokens_total"] < 60 + 200  # not decoded to the end


def test_shutdown_cancels_or_drains(make_engine):
    engine = make_engine()
    ids = engine.encode(TEXTS[1])
    with Gate(engine.model, 3) as gate:
        running = engine.stream(ids, greedy(400, ignore_eos=True))
        gate.wait_parked()
        engine.shutdown(timeout=0)  # refuse new work; the thread stops after this step
        gate.release()
        engine.shutdown()
    list(running)  # what was decoded before the shutdown still arrives
    assert running.result.finish_reason == "cancelled" and running.result.completion_tokens < 400
    with pytest.raises(RuntimeError, match="shut down"):
        engine.stream(ids, greedy(5))

    engine = make_engine()
    pending = engine.stream(ids, greedy(20, ignore_eos=True))
    engine.shutdown(drain=True)
    assert list(pending) and pending.result.finish_reason == "length"
