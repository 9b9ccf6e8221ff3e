"""lm-eval (EleutherAI lm-evaluation-harness) tasks equivalent to our log-likelihood scoring.

lm-eval's own ``cmmlu`` / ``ceval-valid`` tasks read the Hugging Face hub datasets and score
a different prompt (another header sentence, a space before the answer letter; the question
and options themselves are rendered as here), so they are neither offline nor comparable item
for item.  This module writes one task YAML per subject that points lm-eval at the same local
CSV files our loader reads and reproduces our prompt (steelworks.evals.prompts) character for
character, then runs lm-eval's HF backend in-process on an already loaded model (``run_lmeval`` runs the same
tasks with any lm-eval model, e.g. ``local-completions`` against our server).  It backs the
parity tests (tests/test_lmeval_parity.py, tests/test_completions_contract.py) and the
throughput benchmark (benchmarks/eval_throughput.py).
Written against lm-eval 0.4.13 (with datasets 5.2, pandas 3.1).

Task fields (per subject; ``{Q}`` is ``Question`` for CMMLU and ``question`` for C-Eval):

- ``dataset_path: csv``, ``dataset_kwargs: {data_files: {<split>: <abs csv>, dev: <abs csv>},
  converters: {<column>: str, ...}, na_filter: false, keep_default_na: false}`` (the ``dev``
  file only with shots).  The converters (``!function builtins.str`` per column) keep every
  cell the exact string in the file: untyped, pandas turns CMMLU's college_actuarial_science
  options into floats (``0.50`` would print as ``0.5``), and an option reading ``None`` or
  ``NA`` into NaN.  C-Eval adds ``usecols`` (id, question, A-D, answer): its official splits
  differ in columns (val lacks explanation, test the answer) and ``datasets`` wants one
  schema for all splits of a dataset.  For that reason C-Eval's
  unanswered test split is supported 0-shot only (its dev shots need the answer column).
- ``test_split: <split>``; with shots, ``fewshot_split: dev`` and
  ``fewshot_config: {sampler: first_n}`` (the fixed dev shots, in file order).  When the
  few-shot split is the evaluated split, ``first_n`` drops the doc itself (every row equal
  to it; rows differ by their id column) and takes the first k of the rest, which is what
  our ``select_shots`` does; otherwise both take the first k.
- ``output_type: multiple_choice``, ``doc_to_choice: [A, B, C, D]``, ``doc_to_target:
  "{{['A', 'B', 'C', 'D'].index(Answer.strip())}}"`` (0 on C-Eval's test split, which has no
  answers: only the log-likelihoods are read).
- ``doc_to_text: "{{Q.strip()}}\\nA. {{A}}\\n...D. {{D}}\\n答案："``: upstream's cmmlu and
  ceval-valid template, character for character.  Our loader strips the question and keeps
  each option as the CSV has it (24 CMMLU dev options end in a space), as upstream does.
- ``description``: our header ``以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n``.
- ``target_delimiter: ""`` (lm-eval's default, which upstream cmmlu keeps, is a space; our
  letter follows "答案：" directly) and ``fewshot_delimiter: "\\n\\n"``, so a k-shot context
  is header + (shot + letter + "\\n\\n") x k + question, exactly ``build_prompt``'s.
- ``num_fewshot: k``, ``metric_list: [acc]``, ``metadata: {version: 1.0}``.

Runner: ``TaskManager(include_path=<dir>, include_defaults=False)`` (indexing lm-eval's ~15k
built-in tasks is not needed here and takes many seconds), ``HFLM(pretrained=<model object>,
tokenizer=<tokenizer>, batch_size=<n>, add_bos_token=False)`` and
``simple_evaluate(model=lm, tasks=..., task_manager=..., limit=..., log_samples=True)`` with
every other argument at its default (no chat template, no system instruction, lm-eval's
seeds).  ``add_bos_token=False`` makes HFLM encode without special tokens, as our scorer
does.  HFLM encodes context + letter together and splits at the context's token count; our
scorer encodes them apart.  The two agree when the tokenizer has no token joining "：" and
the letter (the parity test checks the ids for its tokenizer).  Our pre-tokenizer, like
cl100k's and Qwen's, lets one punctuation mark lead a word, so a BPE trained on web text
that has "：A" often (../shared's samples do) learns "：A" as one token; then the base-model
prompt has no token boundary before the letter, lm-eval's HFLM stops with ``assert
len(continuation_enc) > 0``, and our scorer asks for a split the model never saw in
training (chat prompts are unaffected: the letter starts the assistant turn's line).  Both left-truncate to
the model's ``max_position_embeddings`` tokens.  The prediction is the argmax of the four
per-letter log-likelihoods in the logged samples, first letter on ties (as lm-eval's ``acc``
and our ``to_records`` break them).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelworks.data.benchmarks import (
    LETTERS,
    MAPPING_FILE,
    _find_csv,
    ceval_subjects,
    cmmlu_subjects,
    detect_layout,
    load_subject_mapping,
)
from steelworks.data.exam_prompt import ANSWER_CUE, HEADER

# Column names as pandas reads the header: CMMLU's unnamed index column becomes "Unnamed: 0".
_COLUMNS = {
    "cmmlu": {"id": "Unnamed: 0", "question": "Question", "answer": "Answer"},
    "ceval": {"id": "id", "question": "question", "answer": "answer"},
}
_CMMLU_WIDTH = 7


@dataclass(frozen=True)
class _Task:
    name: str
    subject: str
    id_column: str


def _csv_files(benchmark_dir: Path, split: str) -> tuple[str, dict[str, tuple[str, Path]]]:
    """(layout, {subject: (chinese name, csv path)}) for the subjects that have ``split``.

    Found by file name only, the way our loader finds them: parsing rows here would add our
    own per-item work to the time the throughput benchmark charges to lm-eval."""
    layout = detect_layout(benchmark_dir)
    if layout == "cmmlu":
        candidates = [(s, benchmark_dir / split / f"{s.name}.csv") for s in cmmlu_subjects()]
    else:
        mapping = (load_subject_mapping(benchmark_dir) if (benchmark_dir / MAPPING_FILE).exists()
                   else ceval_subjects())
        candidates = [(s, _find_csv(benchmark_dir, s.name, split)) for s in mapping]
    found = {s.name: (s.name_zh, p.resolve()) for s, p in candidates if p is not None and p.exists()}
    if not found:
        raise FileNotFoundError(f"{benchmark_dir}: no {split!r} CSV for any {layout} subject")
    return layout, found


def _yaml_str(text: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, escapes and all.
    return json.dumps(text, ensure_ascii=False)


def _task_yaml(name: str, layout: str, subject_zh: str, data_files: dict[str, Path],
               split: str, num_shots: int, cache_dir: Path | None) -> str:
    cols = _COLUMNS[layout]
    # Upstream's cmmlu/ceval doc_to_text verbatim: the question stripped, the options not.
    text = "{{" + cols["question"] + ".strip()}}\n"
    text += "".join(f"{letter}. {{{{{letter}}}}}\n" for letter in LETTERS) + ANSWER_CUE
    # Upstream's target template plus the strip our loader applies.  Kept this short on
    # purpose: lm-eval compiles a template afresh on every call (several per item), so a
    # longer expression would bill lm-eval for our choice of template in the benchmark.
    target = f"{{{{{list(LETTERS)!r}.index({cols['answer']}.strip())}}}}"
    # C-Eval's test split withholds answers: the target is a placeholder there (only the
    # log-likelihoods are read).
    unanswered = layout == "ceval" and split == "test"
    kwargs = {"data_files": "{" + ", ".join(f"{_yaml_str(k)}: {_yaml_str(str(v))}"
                                             for k, v in data_files.items()) + "}"}
    if layout == "cmmlu":  # fixed columns; the unnamed index is easiest to address by position
        keys: list[Any] = list(range(_CMMLU_WIDTH))
    else:
        # C-Eval's splits differ in their columns (val lacks explanation, test the answer), and
        # `datasets` needs one schema for all the splits of a dataset: read only those used.
        keys = [cols["id"], cols["question"], *LETTERS] + ([] if unanswered else [cols["answer"]])
        kwargs["usecols"] = json.dumps(keys)
    kwargs["converters"] = "{" + ", ".join(f"{json.dumps(k)}: !function builtins.str"
                                           for k in keys) + "}"
    kwargs |= {"na_filter": "false", "keep_default_na": "false"}
    if cache_dir is not None:
        kwargs["cache_dir"] = _yaml_str(str(cache_dir))
    lines = [
        f"task: {name}",
        "dataset_path: csv",
        "dataset_kwargs: {" + ", ".join(f"{k}: {v}" for k, v in kwargs.items()) + "}",
        f"test_split: {split}",
        "output_type: multiple_choice",
        f"description: {_yaml_str(HEADER.format(subject=subject_zh))}",
        f"doc_to_text: {_yaml_str(text)}",
        f"doc_to_choice: {json.dumps(list(LETTERS))}",
        f"doc_to_target: {0 if unanswered else _yaml_str(target)}",
        'target_delimiter: ""',
        'fewshot_delimiter: "\\n\\n"',
        f"num_fewshot: {num_shots}",
        "metric_list: [{metric: acc, aggregation: mean, higher_is_better: true}]",
        "metadata: {version: 1.0}",
    ]
    if num_shots > 0:
        lines += ["fewshot_split: dev", "fewshot_config: {sampler: first_n}"]
    return "\n".join(lines) + "\n"


def _write_tasks(benchmark_dir: str | Path, out_dir: str | Path, split: str, num_shots: int,
                 cache_dir: str | Path | None, subjects: Sequence[str] | None = None
                 ) -> list[_Task]:
    if num_shots < 0:
        raise ValueError("num_shots must be >= 0")
    benchmark_dir, out_dir = Path(benchmark_dir), Path(out_dir)
    layout, files = _csv_files(benchmark_dir, split)
    if subjects is not None:  # a subset, kept in the benchmark's subject order
        unknown = sorted(set(subjects) - set(files))
        if unknown:
            raise ValueError(f"{benchmark_dir}: no {split!r} CSV for subjects {unknown}; "
                             f"have: {', '.join(files)}")
        files = {k: v for k, v in files.items() if k in set(subjects)}
    shots: dict[str, tuple[str, Path]] = {}
    if num_shots > 0 and layout == "ceval" and split == "test":
        # One `datasets` CSV config needs one schema, and the answers exist only in dev.
        raise ValueError("lm-eval tasks over C-Eval's unanswered test split cannot also read "
                         "its dev shots; use num_shots=0 there, or the val split")
    if num_shots > 0:
        _, shots = _csv_files(benchmark_dir, "dev")
        missing = sorted(set(files) - set(shots))
        if missing:  # as runner.load_items: every subject needs its dev shots
            raise FileNotFoundError(f"{benchmark_dir}: {num_shots}-shot evaluation needs a dev "
                                    f"CSV for every subject; missing: {', '.join(missing)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for subject, (name_zh, path) in files.items():
        name = f"steelworks_{layout}_{subject}"
        data_files = {split: path} | ({"dev": shots[subject][1]} if num_shots > 0 else {})
        (out_dir / f"{name}.yaml").write_text(
            _task_yaml(name, layout, name_zh, data_files, split, num_shots,
                       None if cache_dir is None else Path(cache_dir).resolve()),
            encoding="utf-8")
        tasks.append(_Task(name, subject, _COLUMNS[layout]["id"]))
    return tasks


def write_lmeval_tasks(benchmark_dir: str | Path, out_dir: str | Path, split: str = "dev",
                       num_shots: int = 0, *, cache_dir: str | Path | None = None,
                       subjects: Sequence[str] | None = None) -> list[str]:
    """Write one lm-eval task YAML per subject of ``benchmark_dir`` (C-Eval or CMMLU layout)
    that has a ``split`` CSV into ``out_dir``; returns the task names, in subject order.

    Load them with ``TaskManager(include_path=out_dir)``; the module docstring lists the
    fields and why each is set.  ``cache_dir`` is where ``datasets`` keeps the Arrow copies
    of the CSVs (default: its own cache, ``HF_DATASETS_CACHE``)."""
    return [t.name for t in _write_tasks(benchmark_dir, out_dir, split, num_shots, cache_dir,
                                         subjects)]


def _import_lm_eval() -> tuple[Any, Any, Any]:
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("lm-eval is a development dependency, needed only to compare against "
                          "it: pip install -e '.[dev]'") from e
    return lm_eval, HFLM, TaskManager


def lmeval_predictions(
    model: Any,
    tokenizer: Any,
    benchmark_dir: str | Path,
    split: str = "dev",
    num_shots: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    subjects: Sequence[str] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """lm-eval's per-item predictions on ``benchmark_dir``, with ``model`` already loaded.

    Returns ``{(subject, item id): {"pred": letter, "scores": {letter: log-likelihood},
    "context": the prompt lm-eval scored}}``; ``limit`` caps the items per subject, like our
    ``eval.max_items``, and ``cache_dir`` is as for ``write_lmeval_tasks``.  The comparable
    call on our side is ``runner.evaluate`` with ``EvalConfig(chat=False, scoring="letter")``.

    Everything from writing the task files to reading the samples happens here, so a timing
    of this call is lm-eval's end to end: task loading, CSV reading, prompt building,
    tokenizing, the forward passes, metrics.  Nothing touches the network: the hub is
    switched off for the process (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``) unless the
    caller set those variables already.  Note that ``simple_evaluate`` reseeds Python's,
    NumPy's and torch's global generators, as it always does.
    """
    _, HFLM, _ = _import_lm_eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
    return run_lmeval(lm, benchmark_dir, split, num_shots, limit, cache_dir=cache_dir,
                      subjects=subjects)


def run_lmeval(
    lm: Any,
    benchmark_dir: str | Path,
    split: str = "dev",
    num_shots: int = 0,
    limit: int | None = None,
    *,
    cache_dir: str | Path | None = None,
    subjects: Sequence[str] | None = None,
) -> dict[tuple[str, str], dict[str, Any]]:
    """``lmeval_predictions`` for any lm-eval model object ``lm`` (an ``lm_eval.api.model.LM``):
    e.g. ``LocalCompletionsAPI`` pointed at a served endpoint, which must then give the HF
    backend's predictions (tests/test_completions_contract.py).  ``subjects`` (names as in
    ``subjects.py``) restricts the run to those subjects."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    lm_eval, _, TaskManager = _import_lm_eval()
    with tempfile.TemporaryDirectory(prefix="steelworks-lmeval-") as tmp:
        tasks = _write_tasks(benchmark_dir, tmp, split, num_shots, cache_dir, subjects)
        manager = TaskManager(include_path=tmp, include_defaults=False)
        results = lm_eval.simple_evaluate(model=lm, tasks=[t.name for t in tasks],
                                          task_manager=manager, limit=limit, log_samples=True)
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for task in tasks:
        for sample in results["samples"][task.name]:
            # One response per choice, in doc_to_choice order: (log-likelihood, is_greedy).
            scores = [float(resp[0]) for resp in sample["filtered_resps"]]
            best = max(range(len(LETTERS)), key=lambda j: scores[j])  # first on ties
            out[(task.subject, str(sample["doc"][task.id_column]).strip())] = {
                "pred": LETTERS[best],
                "scores": dict(zip(LETTERS, scores, strict=True)),
                "context": sample["arguments"][0][0],
            }
    return out
