"""The embedded demo default: a deterministic bilingual (zh/en, Chinese-first) synthetic world.

The world is made of INVENTED entities -- people, cities and animal species with made-up
Chinese and English names -- each holding one value per attribute from a small closed set
(a person's hometown is one of the invented cities, a city's river is an invented river ...).
Because nothing here exists outside this package, no pretraining prior can answer the exam:
a model scores only what it learnt from ``pretrain.jsonl`` and ``sft.jsonl``.

``generate(cfg, out_dir)`` writes::

    pretrain.jsonl   {"id", "text", "lang": "zh"|"en"}: short documents of a few fact
                     sentences from different entities (many templates per attribute and
                     language) plus filler; a few exact duplicate documents and a few very
                     short junk lines are planted on purpose for the data stage's dedup and
                     length filter (counted in the summary).
    sft.jsonl        {"id", "messages": [{"role", "content"}], "task_type"}: "qa" (chat
                     questions about the facts), "exam" (practice multiple-choice items in the
                     exam prompt layout, answered with the bare letter), "self_cognition".
    exam/            C-Eval layout: ``{subject}_{dev,val,test}.csv`` over disjoint facts: dev
                     (few-shot rows), val (for tuning) and test (the reported exam; each
                     fact asked in every exam phrasing), columns exactly
                     ``id,question,A,B,C,D,answer,explanation``, and ``subject_mapping.json``
                     ``{subject: [english_name, chinese_name, category]}``.
    world.json       the entities and facts, each fact linked to its exam row.

Four template families never share a sentence: pretraining declaratives, chat-QA questions,
SFT practice exam questions and the EXAM questions -- the model must know the fact, not the
string. Distractors are other values of the same attribute; the correct letter is balanced
over A-D per subject and split. The tables themselves (templates, value sets, name parts,
fillers, self-cognition texts, junk lines) live in ``steelworks.data.demo_templates``.

The exam prompt (``data.exam_prompt.zero_shot_prompt``) is the standard C-Eval zero-shot layout::

    以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n{question}\\n
    A. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(one string: header, blank line, question, the four lettered options, the answer cue).
SFT exam items use it verbatim as the user turn with the bare letter as the assistant turn,
the same builder every eval backend uses.

Same config -> byte-identical files: every random choice comes from ``random.Random`` streams
seeded by ``(seed, purpose)`` strings (stable across processes), iteration is over lists in
a fixed order, and nothing reads the clock. The world itself depends only on ``seed`` and
``num_entities``, so changing an SFT knob never changes the facts.
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steelworks.core.atomic import atomic_open, atomic_write_json, atomic_write_text
from steelworks.data.config import DemoCorpusConfig
from steelworks.data.demo_templates import (
    _DOC_FACTS,
    _EN_CITY_SUFFIX,
    _EN_CODAS,
    _EN_NUCLEI,
    _EN_ONSETS,
    _EN_WRAPPERS,
    _FILLER,
    _KIND_SHARE,
    _SELF_ANS_EN,
    _SELF_ANS_EN_CREATOR,
    _SELF_ANS_ZH,
    _SELF_ANS_ZH_CREATOR,
    _SELF_EN,
    _SELF_EN_CREATOR,
    _SELF_ZH,
    _SELF_ZH_CREATOR,
    _SUFFIXES,
    _WRAP_PROBABILITY,
    _ZH_CITY,
    _ZH_CITY_SUFFIX,
    _ZH_GIVEN,
    _ZH_SPECIES,
    _ZH_SPECIES_SUFFIX,
    _ZH_SURNAMES,
    _ZH_WRAPPERS,
    ATTRIBUTE_BY_KEY,
    ATTRIBUTES,
    DEMO_SUBJECTS,
    EXAM_COLUMNS,
    JUNK_LINES,
    JUNK_MAX_CHARS,
    KINDS,
    LETTERS,
    Attribute,
)
from steelworks.data.exam_prompt import zero_shot_prompt


@dataclass(frozen=True)
class Entity:
    id: str
    kind: str
    zh: str
    en: str


@dataclass(frozen=True)
class Fact:
    id: str
    entity: Entity
    attribute: str
    zh: str  # the value
    en: str

    @property
    def subject(self) -> str:
        return ATTRIBUTE_BY_KEY[self.attribute].subject


def _rng(cfg: DemoCorpusConfig, purpose: str) -> random.Random:
    # A str seed is hashed with SHA-512 by random.seed: stable across processes and platforms.
    return random.Random(f"steelworks-demo:{cfg.seed}:{purpose}")


def kind_counts(num_entities: int) -> dict[str, int]:
    person = round(num_entities * _KIND_SHARE["person"])
    city = round(num_entities * _KIND_SHARE["city"])
    return {"person": person, "city": city, "species": num_entities - person - city}


def _en_word(rng: random.Random, syllables: int) -> str:
    word = "".join(rng.choice(_EN_ONSETS) + rng.choice(_EN_NUCLEI) for _ in range(syllables))
    return word + rng.choice(_EN_CODAS)


def _draw_name(rng: random.Random, kind: str) -> tuple[str, str]:
    if kind == "person":
        zh = rng.choice(_ZH_SURNAMES) + "".join(rng.sample(_ZH_GIVEN, rng.choice((1, 2))))
        en = _en_word(rng, 3 if rng.random() < 0.25 else 2)
    elif kind == "city":
        zh = "".join(rng.sample(_ZH_CITY, 2)) + rng.choice(_ZH_CITY_SUFFIX)
        en = _en_word(rng, 1) + rng.choice(_EN_CITY_SUFFIX)
    else:
        zh = "".join(rng.sample(_ZH_SPECIES, 2)) + rng.choice(_ZH_SPECIES_SUFFIX)
        en = _en_word(rng, 2)
    return zh, en.capitalize()


def _clashes(zh: str, en: str, taken: list[tuple[str, str]], strict: bool) -> bool:
    """A name clashes if it contains or is contained in another (zh or en); ``strict``
    also rejects a zh name sharing a character (suffixes aside) or an en name sharing its
    first three letters with another, so that names are easy to tell apart for a tiny model.
    """
    low = en.lower()
    for t_zh, t_en in taken:
        if zh in t_zh or t_zh in zh or low in t_en.lower() or t_en.lower() in low:
            return True
        if strict and (set(_core(zh)) & set(_core(t_zh)) or low[:3] == t_en.lower()[:3]):
            return True
    return False


def _core(zh: str) -> str:
    """A zh name without its kind suffix (城, 兽 ...): the characters that identify it."""
    return zh[:-1] if zh[-1] in _SUFFIXES else zh


def build_world(cfg: DemoCorpusConfig) -> tuple[list[Entity], list[Fact]]:
    """Entities (persons, cities, species) and one fact per entity and attribute.

    Names are unique and none is a substring of another (zh or en), so a name in a question
    identifies exactly one entity. Values are dealt out balanced (each value of an attribute
    used about equally often), so always guessing the most common value does not pay.
    """
    counts = kind_counts(cfg.num_entities)
    if counts["city"] < 4:
        raise ValueError(f"demo.num_entities={cfg.num_entities} gives {counts['city']} cities; "
                         "hometown questions need >= 4 (use num_entities >= 12)")
    rng = _rng(cfg, "names")
    entities: list[Entity] = []
    taken: list[tuple[str, str]] = []
    for kind in KINDS:
        for i in range(counts[kind]):
            # Strict (no shared characters) while the name space allows, then only unique.
            for attempt in range(20_000):
                zh, en = _draw_name(rng, kind)
                if not _clashes(zh, en, taken, strict=attempt < 2_000):
                    break
            else:  # pragma: no cover - the name space is far larger than any sane config
                raise ValueError(f"could not draw {counts[kind]} distinct {kind} names")
            taken.append((zh, en))
            entities.append(Entity(f"{kind}_{i:02d}", kind, zh, en))
    facts: list[Fact] = []
    rng = _rng(cfg, "facts")
    for attr in ATTRIBUTES:
        owners = [e for e in entities if e.kind == attr.kind]
        pool = list(value_set(attr, entities))
        dealt: list[tuple[str, str]] = []
        while len(dealt) < len(owners):
            rng.shuffle(pool)
            dealt += pool
        dealt = dealt[: len(owners)]
        rng.shuffle(dealt)
        for ent, (zh, en) in zip(owners, dealt, strict=True):
            facts.append(Fact(f"{ent.id}.{attr.key}", ent, attr.key, zh, en))
    return entities, facts


def value_set(attr: Attribute, entities: list[Entity]) -> tuple[tuple[str, str], ...]:
    """The closed set of (zh, en) values of ``attr``; hometowns are the invented cities."""
    if attr.key == "hometown":
        return tuple((e.zh, e.en) for e in entities if e.kind == "city")
    return attr.values


def _render(template: str, fact: Fact, lang: str, wrapper: str = "") -> str:
    e = fact.entity.zh if lang == "zh" else fact.entity.en
    v = fact.zh if lang == "zh" else fact.en
    if lang == "en" and wrapper and template[0].isupper():
        template = template[0].lower() + template[1:]  # "The {e} ..." -> "... that the {e} ..."
    text = (wrapper + template).format(e=e, v=v)
    return text[0].upper() + text[1:] if lang == "en" else text


def _balanced_positions(rng: random.Random, n: int) -> list[int]:
    """Correct-answer positions 0..3, each used n//4 or n//4+1 times, in shuffled order."""
    positions = [i % len(LETTERS) for i in range(n)]
    rng.shuffle(positions)
    return positions


def _options(rng: random.Random, fact: Fact, pool: tuple[tuple[str, str], ...],
             position: int) -> dict[str, str]:
    others = sorted({zh for zh, _ in pool if zh != fact.zh})
    choices = rng.sample(others, len(LETTERS) - 1)
    choices.insert(position, fact.zh)
    return dict(zip(LETTERS, choices, strict=True))


def _pretrain_docs(cfg: DemoCorpusConfig, facts: list[Fact]) -> tuple[list[dict], dict[str, int]]:
    rng = _rng(cfg, "pretrain")
    sentences: dict[str, list[str]] = {"zh": [], "en": []}
    for fact in facts:
        attr = ATTRIBUTE_BY_KEY[fact.attribute]
        n_zh = round(cfg.pretrain_renderings * cfg.zh_fraction)
        for lang, n in (("zh", n_zh), ("en", cfg.pretrain_renderings - n_zh)):
            # Cycle through the templates in a shuffled order: every phrasing gets used.
            templates = list(attr.pretrain_zh if lang == "zh" else attr.pretrain_en)
            rng.shuffle(templates)
            wrappers = _ZH_WRAPPERS if lang == "zh" else _EN_WRAPPERS
            for i in range(n):
                wrap = rng.choice(wrappers) if rng.random() < _WRAP_PROBABILITY else ""
                sentences[lang].append(_render(templates[i % len(templates)], fact, lang, wrap))
    docs: list[dict] = []
    seen: set[str] = set()
    fillers = 0
    for lang in ("zh", "en"):
        pool = sentences[lang]
        rng.shuffle(pool)
        i = 0
        while i < len(pool):
            k = rng.randint(*_DOC_FACTS)
            chunk = pool[i: i + k]
            i += k
            if rng.random() < cfg.filler_probability:
                chunk.insert(rng.randint(0, len(chunk)), rng.choice(_FILLER[lang]))
                fillers += 1
            text = ("" if lang == "zh" else " ").join(chunk)
            while text in seen:  # keep natural documents unique: duplicates are only planted
                extra = rng.choice(_FILLER[lang])
                text = text + ("" if lang == "zh" else " ") + extra
                fillers += 1
            seen.add(text)
            docs.append({"text": text, "lang": lang})
    qa_docs = _pretrain_qa_docs(cfg, facts, seen)
    docs += qa_docs
    rng.shuffle(docs)
    natural = len(docs)
    # Planted on purpose: exact copies of some documents, and junk under the length filter.
    for j in sorted(rng.sample(range(natural), min(cfg.planted_duplicates, natural))):
        docs.append(dict(docs[j]))
    for junk in JUNK_LINES[: cfg.planted_junk]:
        docs.append({"text": junk, "lang": "en" if junk.isascii() else "zh"})
    rng.shuffle(docs)
    out = [{"id": f"demo-pt-{i:06d}", "text": d["text"], "lang": d["lang"]}
           for i, d in enumerate(docs)]
    stats = {"fact_sentences": sum(len(s) for s in sentences.values()),
             "filler_sentences": fillers, "natural_docs": natural, "qa_docs": len(qa_docs),
             "planted_duplicates": min(cfg.planted_duplicates, natural),
             "planted_junk": cfg.planted_junk}
    return out, stats


def _pretrain_qa_docs(cfg: DemoCorpusConfig, facts: list[Fact], seen: set[str]) -> list[dict]:
    """Question-answer pairs as pretraining text ("问：…\n答：…"), three to a document.

    Mixing QA-form text into pretraining makes the stored facts extractable by questions
    (Allen-Zhu & Li, "Physics of Language Models 3.1"); real Chinese corpora carry such text
    too (Baidu QA, WanJuan exams). Uses the QA templates, never the exam's. A separate RNG
    stream keeps the declarative documents unchanged when this knob changes."""
    rng = _rng(cfg, "pretrain-qa")
    pairs: list[tuple[str, str]] = []
    for fact in facts:
        attr = ATTRIBUTE_BY_KEY[fact.attribute]
        for _ in range(cfg.pretrain_qa_renderings):
            lang = "zh" if rng.random() < cfg.zh_fraction else "en"
            q = _render(rng.choice(attr.qa_zh if lang == "zh" else attr.qa_en), fact, lang)
            a = _render(rng.choice((attr.pretrain_zh if lang == "zh" else attr.pretrain_en)[:3]),
                        fact, lang)
            pairs.append((lang, f"问：{q}\n答：{a}" if lang == "zh" else f"Q: {q}\nA: {a}"))
    rng.shuffle(pairs)
    docs = []
    for lang in ("zh", "en"):
        pool = [text for code, text in pairs if code == lang]
        for i in range(0, len(pool), 3):
            text = "\n".join(pool[i: i + 3])
            while text in seen:  # duplicates are only ever planted on purpose
                text += "\n" + rng.choice(pool)
            seen.add(text)
            docs.append({"text": text, "lang": lang})
    return docs


def _sft_samples(cfg: DemoCorpusConfig, entities: list[Entity], facts: list[Fact]) -> list[dict]:
    rng = _rng(cfg, "sft")
    samples: list[dict] = []

    def add(task: str, user: str, assistant: str) -> None:
        n = sum(1 for s in samples if s["task_type"] == task)
        samples.append({"id": f"demo-{task.replace('_', '-')}-{n:05d}",
                        "messages": [{"role": "user", "content": user},
                                     {"role": "assistant", "content": assistant}],
                        "task_type": task})

    for fact in facts:
        attr = ATTRIBUTE_BY_KEY[fact.attribute]
        for _ in range(cfg.sft_questions_per_fact):
            lang = "zh" if rng.random() < cfg.zh_fraction else "en"
            question = rng.choice(attr.qa_zh if lang == "zh" else attr.qa_en)
            # Answers reuse the three plainest declaratives: short sentences with the value.
            answer = rng.choice((attr.pretrain_zh if lang == "zh" else attr.pretrain_en)[:3])
            add("qa", _render(question, fact, lang), _render(answer, fact, lang))
    positions = _balanced_positions(rng, len(facts) * cfg.sft_exam_per_fact)
    for n, (fact, k) in enumerate((f, k) for f in facts for k in range(cfg.sft_exam_per_fact)):
        attr = ATTRIBUTE_BY_KEY[fact.attribute]
        question = _render(attr.practice[(k + rng.randrange(len(attr.practice))) % len(attr.practice)], fact, "zh")
        options = _options(rng, fact, value_set(attr, entities), positions[n])
        prompt = zero_shot_prompt(DEMO_SUBJECTS[attr.subject][1], question, options)
        letter = LETTERS[positions[n]]
        add("exam", prompt, options[letter] if cfg.sft_exam_answer == "option" else letter)
    for _ in range(cfg.self_cognition_samples):
        zh = rng.random() < cfg.zh_fraction
        creator = rng.random() < 1 / 3
        questions = (_SELF_ZH_CREATOR if creator else _SELF_ZH) if zh else \
            (_SELF_EN_CREATOR if creator else _SELF_EN)
        answers = (_SELF_ANS_ZH_CREATOR if creator else _SELF_ANS_ZH) if zh else \
            (_SELF_ANS_EN_CREATOR if creator else _SELF_ANS_EN)
        add("self_cognition", rng.choice(questions),
            rng.choice(answers).format(name=cfg.model_name, author=cfg.model_author))
    rng.shuffle(samples)
    return samples


def _preference_pairs(cfg: DemoCorpusConfig, entities: list[Entity], facts: list[Fact]) -> list[dict]:
    """DPO pairs in the ``{prompt, chosen, rejected}`` layout: a chat question about a fact,
    the true answer chosen, and the same answer sentence with another value of the
    attribute (drawn from its closed value set) rejected. Only the value differs, so the
    preference is about the fact, not the wording."""
    rng = _rng(cfg, "preference")
    pairs: list[dict] = []
    for fact in facts:
        attr = ATTRIBUTE_BY_KEY[fact.attribute]
        others = [v for v in value_set(attr, entities) if v[0] != fact.zh]
        for _ in range(cfg.preference_per_fact):
            lang = "zh" if rng.random() < cfg.zh_fraction else "en"
            question = rng.choice(attr.qa_zh if lang == "zh" else attr.qa_en)
            answer = rng.choice((attr.pretrain_zh if lang == "zh" else attr.pretrain_en)[:3])
            wrong_zh, wrong_en = rng.choice(others)
            wrong = Fact(fact.id, fact.entity, fact.attribute, wrong_zh, wrong_en)
            pairs.append({"id": f"demo-pref-{len(pairs):05d}", "fact": fact.id,
                          "prompt": _render(question, fact, lang),
                          "chosen": _render(answer, fact, lang),
                          "rejected": _render(answer, wrong, lang)})
    rng.shuffle(pairs)
    return pairs


def _exam(cfg: DemoCorpusConfig, entities: list[Entity],
          facts: list[Fact]) -> tuple[dict[str, dict[str, list[dict]]], dict[str, dict]]:
    """Rows per subject and split, and fact id -> its exam location.

    Each subject's facts are dealt into three disjoint splits, as in C-Eval: ``dev`` (the
    few-shot examples, one row per fact), ``val`` (for tuning; ``val_per_subject`` facts)
    and ``test`` (the reported exam; every other fact). A val or test fact is asked
    ``exam_questions_per_fact`` times, each with another exam phrasing and fresh
    distractors, so the test split is large enough to be more than a coin toss without
    growing the world the model must learn in CPU-minutes."""
    rng = _rng(cfg, "exam")
    rows: dict[str, dict[str, list[dict]]] = {}
    where: dict[str, dict] = {}
    for subject in DEMO_SUBJECTS:
        subject_facts = [f for f in facts if f.subject == subject]
        held = cfg.dev_per_subject + cfg.val_per_subject
        if len(subject_facts) <= held:
            raise ValueError(f"subject {subject} has {len(subject_facts)} facts; need more than "
                             f"demo.dev_per_subject + demo.val_per_subject = {held} "
                             "(raise num_entities)")
        rng.shuffle(subject_facts)
        splits = {"dev": subject_facts[: cfg.dev_per_subject],
                  "val": subject_facts[cfg.dev_per_subject: held],
                  "test": subject_facts[held:]}
        rows[subject] = {}
        for split, split_facts in splits.items():
            asks = 1 if split == "dev" else cfg.exam_questions_per_fact
            # (fact, phrasing) pairs: phrasings rotate from a random start per fact.
            questions = [(f, (start + k) % len(ATTRIBUTE_BY_KEY[f.attribute].exam))
                         for f in split_facts
                         for start in [rng.randrange(len(ATTRIBUTE_BY_KEY[f.attribute].exam))]
                         for k in range(asks)]
            positions = _balanced_positions(rng, len(questions))
            rows[subject][split] = []
            for i, ((fact, phrasing), pos) in enumerate(zip(questions, positions, strict=True)):
                attr = ATTRIBUTE_BY_KEY[fact.attribute]
                options = _options(rng, fact, value_set(attr, entities), pos)
                statement = _render(attr.pretrain_zh[0], fact, "zh").rstrip("。")
                rows[subject][split].append({
                    "id": str(i), "question": _render(attr.exam[phrasing], fact, "zh"),
                    **options, "answer": LETTERS[pos],
                    "explanation": f"{statement}，所以答案是{LETTERS[pos]}。",
                })
                loc = where.setdefault(fact.id, {"subject": subject, "split": split, "ids": []})
                loc["ids"].append(str(i))
    return rows, where


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EXAM_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def generate(cfg: DemoCorpusConfig, out_dir: str | Path) -> dict[str, Any]:
    """Write pretrain.jsonl, sft.jsonl, preference.jsonl, exam/ and world.json under
    ``out_dir``; return a summary.

    Each file is written atomically. The summary holds counts per file, task type and
    subject, the planted duplicates and junk, and ``files`` (paths relative to ``out_dir``).
    """
    out = Path(out_dir)
    entities, facts = build_world(cfg)
    rows, where = _exam(cfg, entities, facts)
    pretrain, pt_stats = _pretrain_docs(cfg, facts)
    sft = _sft_samples(cfg, entities, facts)
    preference = _preference_pairs(cfg, entities, facts)

    files: list[str] = []
    _write_jsonl(out / "pretrain.jsonl", pretrain)
    _write_jsonl(out / "sft.jsonl", sft)
    _write_jsonl(out / "preference.jsonl", preference)
    files += ["pretrain.jsonl", "sft.jsonl", "preference.jsonl"]
    for subject, splits in rows.items():
        for split, split_rows in splits.items():
            atomic_write_text(out / "exam" / f"{subject}_{split}.csv", _csv_text(split_rows))
            files.append(f"exam/{subject}_{split}.csv")
    atomic_write_json(out / "exam" / "subject_mapping.json", DEMO_SUBJECTS)
    files.append("exam/subject_mapping.json")
    world = {
        "seed": cfg.seed,
        "subjects": {s: {"name_en": m[0], "name_zh": m[1], "category": m[2],
                         "attributes": [a.key for a in ATTRIBUTES if a.subject == s]}
                     for s, m in DEMO_SUBJECTS.items()},
        "attributes": {a.key: {"kind": a.kind, "subject": a.subject, "name_zh": a.name_zh,
                               "name_en": a.name_en,
                               "values": [{"zh": zh, "en": en} for zh, en in value_set(a, entities)]}
                       for a in ATTRIBUTES},
        "entities": [{"id": e.id, "kind": e.kind, "zh": e.zh, "en": e.en} for e in entities],
        "facts": [{"id": f.id, "entity": f.entity.id, "attribute": f.attribute,
                   "subject": f.subject, "value": {"zh": f.zh, "en": f.en}, "exam": where[f.id]}
                  for f in facts],
    }
    atomic_write_json(out / "world.json", world)
    files.append("world.json")

    def count(items: list[dict], key: str) -> dict[str, int]:
        keys = sorted({str(x[key]) for x in items})
        return {k: sum(1 for x in items if str(x[key]) == k) for k in keys}

    test_rows = [r for s in rows.values() for r in s["test"]]
    return {
        "seed": cfg.seed,
        "entities": kind_counts(cfg.num_entities),
        "facts": len(facts),
        "facts_per_subject": {s: sum(1 for f in facts if f.subject == s) for s in DEMO_SUBJECTS},
        "pretrain": {"docs": len(pretrain), "chars": sum(len(d["text"]) for d in pretrain),
                     "per_lang": count(pretrain, "lang"),
                     "chars_per_lang": {lang: sum(len(d["text"]) for d in pretrain
                                                  if d["lang"] == lang) for lang in ("zh", "en")},
                     **pt_stats,
                     "junk_max_chars": JUNK_MAX_CHARS},
        "sft": {"samples": len(sft), "per_task_type": count(sft, "task_type")},
        "preference": {"pairs": len(preference)},
        "exam": {"per_subject": {s: {split: len(r) for split, r in v.items()}
                                 for s, v in rows.items()},
                 **{split: sum(len(s[split]) for s in rows.values())
                    for split in ("dev", "val", "test")},
                 "test_facts": sum(1 for loc in where.values() if loc["split"] == "test"),
                 "test_answers": {letter: sum(1 for r in test_rows if r["answer"] == letter)
                                  for letter in LETTERS}},
        "files": sorted(files),
    }
