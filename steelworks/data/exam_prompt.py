"""The multiple-choice exam prompt, in the standard C-Eval layout: the one builder for the SFT
exam items the data stage writes (``demo_corpus``) and for every eval backend (log-likelihood,
generative, HTTP; ``evals.prompts``), so a model is scored on exactly the text it learnt.

Zero-shot, a prompt is exactly::

    以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(one string; the line breaks above are the ``\\n`` shown). k-shot inserts k answered
examples, each ``{question}\\nA. ..\\nD. {D}\\n答案：{letter}\\n\\n``, between the header and
the question. SFT exam items use the zero-shot text as the user message and the bare letter
(or the option) as the assistant message. It lives in data/ because the data stage writes it
and evals/ sits above data/ (docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from steelworks.data.benchmarks import LETTERS, Item

HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER_CUE = "答案："


def question_block(question: str, options: Mapping[str, str]) -> str:
    """The question, its four lettered options and the answer cue."""
    if sorted(options) != list(LETTERS):
        raise ValueError(f"options must have exactly the keys A, B, C, D; got {sorted(options)}")
    return question + "\n" + "".join(f"{letter}. {options[letter]}\n" for letter in LETTERS) + ANSWER_CUE


def format_question(item: Item, include_answer: bool) -> str:
    """``question_block`` of a benchmark item, plus its answer and a blank line for a shot."""
    text = question_block(item.question, item.options)
    if include_answer:
        if item.answer is None:
            raise ValueError(
                f"{item.source}:{item.line}: item {item.id!r} has no answer and cannot be a shot"
            )
        text += f"{item.answer}\n\n"
    return text


def zero_shot_prompt(subject_zh: str, question: str, options: Mapping[str, str]) -> str:
    """Header + the unanswered question: what an SFT exam item's user turn says."""
    return HEADER.format(subject=subject_zh) + question_block(question, options)


def build_prompt(subject_zh: str, item: Item, shots: Sequence[Item] = ()) -> str:
    """Header + answered shots + the unanswered question (ends with the answer cue)."""
    return (
        HEADER.format(subject=subject_zh)
        + "".join(format_question(shot, include_answer=True) for shot in shots)
        + format_question(item, include_answer=False)
    )
