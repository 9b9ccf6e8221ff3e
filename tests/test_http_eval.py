"""HTTP log-likelihood evaluation (steelworks/evals/http_backend.py): against a live uvicorn
server over the shaken tiny model, ``predict_http`` must give ``scoring.predict``'s records —
same predictions, same scores — for the same model loaded in this process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import uvicorn_in_thread

from steelworks.data.benchmarks import Item, Subject, load_ceval_layout
from steelworks.data.exam_prompt import build_prompt
from steelworks.evals.config import EvalConfig
from steelworks.evals.http_backend import HTTPEvalError, predict_http
from steelworks.evals.scoring import predict
from steelworks.inference.engine import Engine
from steelworks.serve.app import build_app
from steelworks.serve.config import ServeConfig

KEY = "sk-eval"
MODEL = "steel"


@pytest.fixture(scope="module")
def engine(shaken_model_dir: Path) -> Iterator[Engine]:
    eng = Engine.from_dir(shaken_model_dir, max_batch_size=4)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server_url(engine: Engine) -> Iterator[str]:
    """The app under a real uvicorn on a free port, in a background thread (as a deployment
    would run it), so requests really travel over HTTP and run concurrently."""
    app = build_app(engine, ServeConfig(api_key=KEY, model_name=MODEL))
    with uvicorn_in_thread(app) as url:
        yield url


@pytest.fixture(scope="module")
def local(shaken_model_dir: Path) -> tuple[Any, Any]:
    """The same model and tokenizer loaded in-process, as the batch evaluator loads them."""
    from steelworks.data.tokenizer import load_tokenizer
    from steelworks.train.models import load_model

    return load_model(shaken_model_dir).eval(), load_tokenizer(shaken_model_dir)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[list[Subject], list[Item], dict[str, list[Item]]]:
    from test_evals import DEV, MAPPING, VAL, _write_csv

    root = tmp_path_factory.mktemp("ceval")
    (root / "subject_mapping.json").write_text(json.dumps(MAPPING, ensure_ascii=False), "utf-8")
    for split, table in (("val", VAL), ("dev", DEV)):
        for subject, rows in table.items():
            _write_csv(root / f"{subject}_{split}.csv", rows)
    subjects, by_subject = load_ceval_layout(root, "val")
    _, shots = load_ceval_layout(root, "dev")
    return subjects, [it for rows in by_subject.values() for it in rows], shots


@pytest.mark.parametrize(
    ("scoring", "num_shots", "chat"),
    [("letter", 0, True), ("letter", 1, True), ("option_text", 0, True),
     ("option_text", 1, True), ("option_text", 0, False)],
)
def test_http_scores_equal_in_process_scores(server_url, local, bench, scoring, num_shots,
                                             chat) -> None:
    model, tok = local
    subjects, items, shots = bench
    cfg = EvalConfig(scoring=scoring, num_shots=num_shots, chat=chat, batch_size=3)
    expected = predict(model, tok, items, subjects, cfg, shots)
    got = predict_http(server_url, items, subjects, cfg, shots, api_key=KEY, model=MODEL,
                       concurrency=4, tokenizer=tok)
    assert len(got) == len(expected) == len(items)
    for g, e in zip(got, expected, strict=True):
        assert {k: g[k] for k in ("subject", "id", "answer", "pred", "correct")} == \
               {k: e[k] for k in ("subject", "id", "answer", "pred", "correct")}
        assert list(g["scores"]) == list(e["scores"]) == ["A", "B", "C", "D"]
        assert list(g["scores"].values()) == pytest.approx(list(e["scores"].values()), abs=1e-4)
    # Not vacuous: the scores tell the four choices apart.
    assert all(len({round(s, 3) for s in r["scores"].values()}) > 1 for r in expected)


def test_tokenizer_from_model_dir_and_v1_base_url(server_url, local, bench,
                                                  shaken_model_dir: Path) -> None:
    model, tok = local
    subjects, items, shots = bench
    cfg = EvalConfig(scoring="letter", num_shots=1)
    got = predict_http(server_url + "/v1/", items[:2], subjects, cfg, shots, api_key=KEY,
                       tokenizer=shaken_model_dir, concurrency=1)
    expected = predict(model, tok, items[:2], subjects, cfg, shots)
    assert [r["pred"] for r in got] == [r["pred"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert list(g["scores"].values()) == pytest.approx(list(e["scores"].values()), abs=1e-4)


class _OutOfVocab:
    """A tokenizer whose ids exceed the model's 512-token vocabulary: the server answers 400."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [1000 + ord(c) for c in text]


def test_errors_name_the_item_and_carry_the_server_message(server_url, bench) -> None:
    subjects, items, _ = bench
    cfg = EvalConfig(scoring="letter", chat=False)
    with pytest.raises(HTTPEvalError) as err:
        predict_http(server_url, items[:1], subjects, cfg, api_key=KEY, tokenizer=_OutOfVocab())
    msg = str(err.value)
    assert f"{items[0].source}:{items[0].line}" in msg and "id '0'" in msg
    assert "HTTP 400" in msg and "token ids must lie in" in msg
    with pytest.raises(HTTPEvalError, match="HTTP 401"):  # wrong key: refused up front
        predict_http(server_url, items[:1], subjects, cfg, api_key="sk-wrong", tokenizer=_OutOfVocab())
    with pytest.raises(HTTPEvalError, match="HTTP 404.*model_not_found"):
        predict_http(server_url, items[:1], subjects, cfg, api_key=KEY, model="other",
                     tokenizer=_OutOfVocab())
    with pytest.raises(ValueError, match="needs the served model's tokenizer"):
        predict_http(server_url, items[:1], subjects, cfg, api_key=KEY)


def test_over_long_requests_are_left_truncated_to_the_server_window(server_url, engine, local,
                                                                    bench, caplog) -> None:
    import torch

    model, tok = local
    subjects, items, _ = bench
    cfg = EvalConfig(scoring="option_text", chat=False)
    window = 24  # shorter than every prompt here; the engine reads its window per request
    original = engine.model.config.max_position_embeddings
    engine.model.config.max_position_embeddings = window
    try:
        with caplog.at_level("WARNING", logger="steelworks.evals.http_backend"):
            got = predict_http(server_url, items[:1], subjects, cfg, api_key=KEY, tokenizer=tok)
    finally:
        engine.model.config.max_position_embeddings = original
    item = items[0]
    ctx = tok.encode(build_prompt("大学物理", item, []),
                     add_special_tokens=False)
    for letter, score in got[0]["scores"].items():
        text = item.options[letter]
        cont = tok.encode(text, add_special_tokens=False)
        kept = (ctx + cont)[-window:]  # the newest `window` tokens, continuation last
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([kept])).logits[0].float(), -1)
        expected = sum(lp[window - len(cont) - 1 + j, t].item() for j, t in enumerate(cont))
        assert score == pytest.approx(expected / len(text), abs=1e-4)
    assert "4 request(s) exceeded the server's 24 tokens" in caplog.text
