"""Prompt text for multiple-choice benchmarks, in the standard C-Eval layout.

Zero-shot, a prompt is exactly::

    以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(one string; the line breaks above are the ``\\n`` shown).  k-shot inserts k answered
examples, each ``{question}\\nA. ..\\nD. {D}\\n答案：{letter}\\n\\n``, between the header and
the question.  The demo corpus's SFT exam items use exactly the zero-shot text as the user
message and the bare letter as the assistant message, so do not change a character here
without changing the corpus builder too: the SFT model is scored on the format it learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steelworks.data.benchmarks import LETTERS, Item

HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER_CUE = "答案："


def format_question(item: Item, include_answer: bool) -> str:
    """The question, its four lettered options and the answer cue (plus the answer for shots)."""
    text = item.question + "\n"
    text += "".join(f"{letter}. {item.options[letter]}\n" for letter in LETTERS)
    text += ANSWER_CUE
    if include_answer:
        if item.answer is None:
            raise ValueError(
                f"{item.source}:{item.line}: item {item.id!r} has no answer and cannot be a shot"
            )
        text += f"{item.answer}\n\n"
    return text


def build_prompt(subject_zh: str, item: Item, shots: Sequence[Item] = ()) -> str:
    """Header + answered shots + the unanswered question (ends with the answer cue)."""
    return (
        HEADER.format(subject=subject_zh)
        + "".join(format_question(shot, include_answer=True) for shot in shots)
        + format_question(item, include_answer=False)
    )


def chat_prompt(tokenizer: Any, prompt_text: str) -> str:
    """``prompt_text`` as one user turn with the assistant turn opened (ChatML for our models).

    The answer letter is then the first token an SFT model produces, the same position the
    SFT loss trained it on.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "evaluate with chat=False or load it with steelworks.data.tokenizer.load_tokenizer"
        )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt_text}], tokenize=False, add_generation_prompt=True
    )
    if not isinstance(text, str):  # some transformers versions wrap single results
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text
