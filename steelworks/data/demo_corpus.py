"""The embedded demo default: a deterministic bilingual (zh/en, Chinese-first) synthetic world.

The world is made of INVENTED entities -- people, cities and animal species with made-up
Chinese and English names -- each holding one value per attribute from a small closed set
(a person's hometown is one of the invented cities, a city's river is an invented river ...).
Because nothing here exists outside this file, no pretraining prior can answer the exam:
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
    exam/            C-Eval layout: ``{subject}_dev.csv`` (few-shot rows), ``{subject}_val.csv``
                     (one question per fact not used in dev), columns exactly
                     ``id,question,A,B,C,D,answer,explanation``, and ``subject_mapping.json``
                     ``{subject: [english_name, chinese_name, category]}``.
    world.json       the entities and facts, each fact linked to its exam row.

Four template families never share a sentence: pretraining declaratives, chat-QA questions,
SFT practice exam questions and the EXAM questions -- the model must know the fact, not the
string. Distractors are other values of the same attribute; the correct letter is balanced
over A-D per subject and split.

The exam prompt (``format_exam_prompt``) is the standard C-Eval zero-shot layout, exactly::

    以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。\\n\\n{question}\\n
    A. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

(one string: header, blank line, question, the four lettered options, the answer cue).
SFT exam items use it verbatim as the user turn with the bare letter as the assistant turn,
the same text ``steelworks.evals.prompts.build_prompt`` produces zero-shot.

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

from steelworks.data.config import DemoCorpusConfig
from steelworks.platform.atomic import atomic_open, atomic_write_json, atomic_write_text

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
EXAM_COLUMNS: tuple[str, ...] = ("id", "question", "A", "B", "C", "D", "answer", "explanation")
EXAM_HEADER = "以下是中国关于{subject_zh}考试的单项选择题，请选出其中的正确答案。"
ANSWER_CUE = "答案："
# The data stage's default ``min_chars`` is 5: planted junk lines are at most this long.
JUNK_MAX_CHARS = 4


def format_exam_prompt(subject_zh: str, question: str, options: dict[str, str]) -> str:
    """The C-Eval zero-shot prompt: header, blank line, question, options A-D, ``答案：``."""
    if sorted(options) != list(LETTERS):
        raise ValueError(f"options must have exactly the keys A, B, C, D; got {sorted(options)}")
    lines = [EXAM_HEADER.format(subject_zh=subject_zh), "", question]
    lines += [f"{letter}. {options[letter]}" for letter in LETTERS]
    return "\n".join(lines) + "\n" + ANSWER_CUE


# subject -> [english_name, chinese_name, C-Eval category]: the subject_mapping.json format.
DEMO_SUBJECTS: dict[str, list[str]] = {
    "demo_geography": ["Demo Geography", "虚构地理", "Social Science"],
    "demo_biography": ["Demo Biography", "虚构人物", "Humanities"],
    "demo_zoology": ["Demo Zoology", "虚构动物学", "STEM"],
    "demo_culture": ["Demo Culture", "虚构风物", "Other"],
}

KINDS: tuple[str, ...] = ("person", "city", "species")
# Share of num_entities per kind (species take the rest). People outnumber cities so that
# hometowns repeat; cities need >= 4 so a hometown question has 3 distinct distractors.
_KIND_SHARE = {"person": 0.4, "city": 0.3}


@dataclass(frozen=True)
class Attribute:
    """One attribute of one entity kind, its closed value set and its four template families.

    Templates use ``{e}`` (entity name) and ``{v}`` (value); ``values`` holds (zh, en) pairs,
    empty for ``hometown`` whose values are the invented cities.
    """

    key: str
    kind: str
    subject: str
    name_zh: str
    name_en: str
    values: tuple[tuple[str, str], ...]
    pretrain_zh: tuple[str, ...]
    pretrain_en: tuple[str, ...]
    qa_zh: tuple[str, ...]
    qa_en: tuple[str, ...]
    practice: tuple[str, ...]  # zh, SFT exam practice items
    exam: tuple[str, ...]  # zh, the scored exam only


def _attr(key: str, kind: str, subject: str, name_zh: str, name_en: str,
          values: list[tuple[str, str]], **templates: list[str]) -> Attribute:
    return Attribute(key, kind, subject, name_zh, name_en, tuple(values),
                     **{k: tuple(v) for k, v in templates.items()})


ATTRIBUTES: tuple[Attribute, ...] = (
    _attr(
        "hometown", "person", "demo_biography", "家乡", "hometown", [],
        pretrain_zh=["{e}的家乡是{v}。", "{e}出生在{v}。", "{e}来自{v}。",
                     "{e}在{v}长大，那里是此人的故乡。", "{v}是{e}的故乡。",
                     "提起故乡，{e}总会想起{v}。", "{e}是土生土长的{v}人。"],
        pretrain_en=["{e} was born in {v}.", "{e} comes from {v}.", "The hometown of {e} is {v}.",
                     "{e} grew up in the city of {v}.", "{v} is where {e} was born and raised.",
                     "Whenever {e} speaks of home, {e} means {v}.", "{e} is a native of {v}."],
        qa_zh=["{e}的家乡是哪里？", "{e}是哪里人？", "{e}出生在哪座城市？"],
        qa_en=["Where is {e} from?", "What is the hometown of {e}?", "In which city was {e} born?"],
        practice=["{e}的故乡是下列哪座城市？", "{e}是在哪座城市出生的？"],
        exam=["根据记载，{e}出身于哪一座城市？", "下列城市中，哪一座是{e}的出生地？"],
    ),
    _attr(
        "profession", "person", "demo_biography", "职业", "profession",
        [("医生", "a doctor"), ("教师", "a teacher"), ("厨师", "a cook"), ("画家", "a painter"),
         ("农夫", "a farmer"), ("铁匠", "a blacksmith"), ("水手", "a sailor"), ("诗人", "a poet"),
         ("木匠", "a carpenter"), ("商人", "a merchant"), ("猎人", "a hunter"),
         ("乐师", "a musician")],
        pretrain_zh=["{e}是一名{v}。", "{e}的职业是{v}。", "{e}以做{v}为生。", "{e}靠当{v}谋生。",
                     "多年以来，{e}一直是一位{v}。", "{e}从年轻时起就当了{v}。",
                     "人们都知道{e}是个{v}。"],
        pretrain_en=["{e} works as {v}.", "{e} is {v} by trade.", "By profession, {e} is {v}.",
                     "{e} has earned a living as {v} for many years.",
                     "Everyone knows that {e} is {v}.", "{e} became {v} at a young age.",
                     "In the market town, {e} is known as {v}."],
        qa_zh=["{e}的职业是什么？", "{e}是做什么工作的？", "{e}靠什么谋生？"],
        qa_en=["What does {e} do for a living?", "What is the profession of {e}?",
               "What job does {e} have?"],
        practice=["{e}的工作是下列哪一种？", "{e}从事下列哪种职业？"],
        exam=["以下哪一项是{e}所从事的行当？", "{e}平日里干的是哪一行？"],
    ),
    _attr(
        "colour", "person", "demo_culture", "最喜欢的颜色", "favourite colour",
        [("红色", "red"), ("蓝色", "blue"), ("绿色", "green"), ("黄色", "yellow"),
         ("紫色", "purple"), ("白色", "white"), ("黑色", "black"), ("橙色", "orange"),
         ("灰色", "grey")],
        pretrain_zh=["{e}最喜欢的颜色是{v}。", "{e}最爱{v}。", "在所有颜色里，{e}偏爱{v}。",
                     "{e}的衣服大多是{v}的。", "{e}总说{v}是世上最好看的颜色。",
                     "{e}把房门漆成了自己最喜欢的{v}。", "{e}对{v}情有独钟。"],
        pretrain_en=["{e}'s favourite colour is {v}.", "{e} loves the colour {v}.",
                     "Of all colours, {e} likes {v} best.", "Most of the clothes of {e} are {v}.",
                     "{e} always says that {v} is the most beautiful colour.",
                     "{e} painted the front door {v}, the favourite colour of {e}.",
                     "{e} has a soft spot for anything {v}."],
        qa_zh=["{e}最喜欢什么颜色？", "{e}偏爱哪种颜色？", "{e}最爱的颜色是什么？"],
        qa_en=["What is {e}'s favourite colour?", "Which colour does {e} like best?",
               "What colour does {e} love most?"],
        practice=["{e}最喜欢下列哪种颜色？", "下列颜色中，{e}最偏爱哪一种？"],
        exam=["若要送{e}一件礼物，挑选哪种颜色最合其心意？", "{e}心目中最美的颜色是以下哪一种？"],
    ),
    _attr(
        "fruit", "person", "demo_culture", "最喜欢的水果", "favourite fruit",
        [("苹果", "apples"), ("香蕉", "bananas"), ("葡萄", "grapes"), ("桃子", "peaches"),
         ("梨", "pears"), ("西瓜", "watermelons"), ("柿子", "persimmons"), ("樱桃", "cherries"),
         ("芒果", "mangoes"), ("石榴", "pomegranates")],
        pretrain_zh=["{e}最喜欢的水果是{v}。", "{e}最爱吃{v}。", "{e}每天都要吃{v}。",
                     "在所有水果中，{e}最喜欢{v}。", "{e}的院子里种满了{v}，因为此人最爱这种水果。",
                     "一到集市，{e}就去买{v}。", "{e}觉得{v}是世上最好吃的水果。"],
        pretrain_en=["{e}'s favourite fruit is {v}.", "{e} loves eating {v}.",
                     "{e} eats {v} every day.", "Of all fruits, {e} likes {v} best.",
                     "The garden of {e} is full of {v}.", "At the market, {e} always buys {v}.",
                     "{e} thinks {v} are the tastiest fruit in the world."],
        qa_zh=["{e}最喜欢吃什么水果？", "{e}最爱的水果是什么？", "哪种水果是{e}的最爱？"],
        qa_en=["What is {e}'s favourite fruit?", "Which fruit does {e} like best?",
               "What fruit does {e} love to eat?"],
        practice=["{e}最爱吃下列哪种水果？", "下列水果中，{e}最喜欢哪一种？"],
        exam=["招待{e}时，端上哪种水果最能让其高兴？", "{e}的果篮里最常见的是以下哪种水果？"],
    ),
    _attr(
        "river", "city", "demo_geography", "河流", "river",
        [("银沙河", "the Silversand River"), ("赤鳞江", "the Redscale River"),
         ("鹭鸣河", "the Heroncall River"), ("雾影江", "the Mistshadow River"),
         ("金雀河", "the Goldfinch River"), ("玉带江", "the Jadebelt River"),
         ("寒泉河", "the Coldspring River"), ("落星河", "the Fallenstar River"),
         ("回龙江", "the Dragonturn River")],
        pretrain_zh=["{e}坐落在{v}畔。", "{v}流经{e}。", "{e}依{v}而建。",
                     "{e}的百姓世代饮用{v}的水。", "{e}的码头就建在{v}边上。",
                     "沿着{v}顺流而下，就能到达{e}。", "{e}的母亲河是{v}。"],
        pretrain_en=["{e} lies on the banks of {v}.", "{v} flows through {e}.",
                     "{e} was built beside {v}.",
                     "The people of {e} have drunk from {v} for generations.",
                     "The docks of {e} sit on {v}.",
                     "Follow {v} downstream and you will reach {e}.",
                     "{v} is the mother river of {e}."],
        qa_zh=["哪条河流经{e}？", "{e}坐落在哪条河边？", "{e}的母亲河是哪一条？"],
        qa_en=["Which river flows through {e}?", "On which river does {e} lie?",
               "What is the mother river of {e}?"],
        practice=["流经{e}的是下列哪条河？", "{e}建在下列哪条河的岸边？"],
        exam=["一位旅人想乘船前往{e}，他应当沿着哪条河航行？", "从{e}穿城而过的是以下哪条河？"],
    ),
    _attr(
        "climate", "city", "demo_geography", "气候", "climate",
        [("炎热", "hot"), ("寒冷", "cold"), ("多雨", "rainy"), ("干燥", "dry"), ("多风", "windy"),
         ("多雾", "foggy"), ("温和", "mild"), ("潮湿", "humid")],
        pretrain_zh=["{e}的气候{v}。", "{e}的气候以{v}著称。", "{e}是一座气候{v}的城市。",
                     "{e}常年{v}。", "去过{e}的人都说那里的天气{v}。", "{e}的天气总是{v}。",
                     "{e}一带的气候向来{v}。"],
        pretrain_en=["The climate of {e} is {v}.", "{e} is a {v} city.",
                     "{e} is {v} all year round.", "Visitors say the weather in {e} is always {v}.",
                     "{e} is known for its {v} weather.",
                     "People who live in {e} are used to {v} days.", "In {e}, most days are {v}."],
        qa_zh=["{e}的气候怎么样？", "{e}的天气有什么特点？", "{e}是什么样的气候？"],
        qa_en=["What is the climate of {e} like?", "What is the weather like in {e}?",
               "How would you describe the climate of {e}?"],
        practice=["{e}的气候属于下列哪一种？", "下列哪一项描述了{e}的天气？"],
        exam=["准备前往{e}的人，最应该为哪种天气做准备？", "{e}一年中大多数日子是什么天气？"],
    ),
    _attr(
        "region", "city", "demo_geography", "地区", "region",
        [("东部海岸", "the eastern coast"), ("西部山区", "the western mountains"),
         ("南部平原", "the southern plains"), ("北部草原", "the northern steppe"),
         ("中部盆地", "the central basin"), ("东北森林", "the northeastern forests"),
         ("西南高原", "the southwestern plateau"), ("西北荒漠", "the northwestern wastes")],
        pretrain_zh=["{e}位于{v}。", "{e}坐落在大陆的{v}。", "{e}是{v}最大的城市之一。",
                     "从地图上看，{e}在{v}。", "{e}地处{v}。", "{e}是{v}的一座古城。",
                     "要去{e}，就得先到{v}。"],
        pretrain_en=["{e} is located in {v}.", "{e} lies in {v} of the continent.",
                     "{e} is one of the largest cities in {v}.",
                     "On the map, {e} can be found in {v}.", "{e} is an old city in {v}.",
                     "To reach {e}, you must first travel to {v}.", "{e} sits in {v}."],
        qa_zh=["{e}位于哪个地区？", "{e}在大陆的什么地方？", "{e}地处何方？"],
        qa_en=["Where is {e} located?", "In which region does {e} lie?",
               "Which part of the continent is {e} in?"],
        practice=["{e}位于下列哪个地区？", "在地图上，{e}应该在下列哪个地区？"],
        exam=["下列地区中，哪一个能找到{e}这座城市？", "{e}属于大陆上的哪一片区域？"],
    ),
    _attr(
        "product", "city", "demo_culture", "特产", "famous product",
        [("丝绸", "silk"), ("瓷器", "porcelain"), ("茶叶", "tea"), ("铁器", "ironware"),
         ("纸张", "paper"), ("美酒", "wine"), ("地毯", "carpets"), ("玻璃", "glassware"),
         ("香料", "spices"), ("蜂蜜", "honey"), ("食盐", "salt"), ("木雕", "wood carvings")],
        pretrain_zh=["{e}的特产是{v}。", "{e}以出产{v}闻名。", "{e}的{v}远近闻名。",
                     "商人们常去{e}采购{v}。", "说到{e}，人们首先想到的就是那里的{v}。",
                     "{e}的集市上到处都在卖{v}。", "{e}生产的{v}销往各地。"],
        pretrain_en=["{e} is famous for its {v}.", "The best-known product of {e} is {v}.",
                     "Merchants travel to {e} to buy {v}.",
                     "{v} made in {e} can be found in every market.",
                     "When people think of {e}, they think of its {v}.",
                     "The markets of {e} are full of {v}.", "{e} exports {v} to many lands."],
        qa_zh=["{e}的特产是什么？", "{e}以什么闻名？", "去{e}应该买什么特产？"],
        qa_en=["What is {e} famous for?", "What is the main product of {e}?",
               "What do merchants buy in {e}?"],
        practice=["{e}最有名的特产是下列哪一项？", "下列物产中，哪一种是{e}的特产？"],
        exam=["从{e}归来的旅人，行囊里最可能装着哪种当地名产？", "{e}的工匠与农人以哪种物产见长？"],
    ),
    _attr(
        "habitat", "species", "demo_zoology", "栖息地", "habitat",
        [("森林", "forests"), ("沙漠", "deserts"), ("沼泽", "swamps"), ("雪山", "snowy mountains"),
         ("草原", "grasslands"), ("海岸", "coasts"), ("洞穴", "caves"), ("湖泊", "lakes"),
         ("竹林", "bamboo groves")],
        pretrain_zh=["{e}栖息于{v}。", "{e}的家在{v}。", "人们只能在{v}找到{e}。",
                     "{e}世代生活在{v}。", "想看{e}，就得去{v}。", "{v}是{e}的栖息地。",
                     "{e}喜欢待在{v}。"],
        pretrain_en=["The {e} lives in {v}.", "The {e} makes its home in {v}.",
                     "You can only find the {e} in {v}.",
                     "For generations the {e} has lived in {v}.",
                     "If you want to see the {e}, go to {v}.",
                     "{v} are the natural habitat of the {e}.", "The {e} prefers to stay in {v}."],
        qa_zh=["{e}生活在哪里？", "{e}的栖息地是什么？", "在哪里能找到{e}？"],
        qa_en=["Where does the {e} live?", "What is the habitat of the {e}?",
               "Where can you find the {e}?"],
        practice=["{e}栖息在下列哪种环境中？", "下列哪里最可能见到{e}？"],
        exam=["一位博物学家想观察野生的{e}，他应该去哪里？", "{e}的巢穴通常筑在哪种地方？"],
    ),
    _attr(
        "diet", "species", "demo_zoology", "食物", "diet",
        [("浆果", "berries"), ("昆虫", "insects"), ("鱼", "fish"), ("青草", "grass"),
         ("树叶", "leaves"), ("种子", "seeds"), ("蘑菇", "mushrooms"), ("贝类", "shellfish"),
         ("花蜜", "nectar"), ("树根", "roots")],
        pretrain_zh=["{e}以{v}为食。", "{e}主要吃{v}。", "{e}最爱吃的食物是{v}。",
                     "{e}每天都要花很多时间寻找{v}。", "{v}是{e}的主食。",
                     "饲养{e}的人必须准备大量{v}。", "{e}靠吃{v}生存。"],
        pretrain_en=["The {e} feeds on {v}.", "The {e} mainly eats {v}.",
                     "The favourite food of the {e} is {v}.",
                     "The {e} spends much of its day searching for {v}.",
                     "The staple food of the {e} is {v}.",
                     "Keepers of the {e} must store plenty of {v}.",
                     "The {e} survives by eating {v}."],
        qa_zh=["{e}吃什么？", "{e}以什么为食？", "{e}的主食是什么？"],
        qa_en=["What does the {e} eat?", "What is the main food of the {e}?",
               "What does the {e} feed on?"],
        practice=["{e}主要以下列哪种食物为生？", "下列食物中，{e}最常吃的是哪一种？"],
        exam=["动物园要喂养{e}，应该给它准备什么食物？", "野外的{e}饿了会去寻找以下哪种东西？"],
    ),
    _attr(
        "covering", "species", "demo_zoology", "体表", "body covering",
        [("羽毛", "feathers"), ("鳞片", "scales"), ("长毛", "long fur"), ("短毛", "short fur"),
         ("甲壳", "armoured plates"), ("尖刺", "spines"), ("光滑的皮肤", "smooth skin")],
        pretrain_zh=["{e}身上长着{v}。", "{e}的身体覆盖着{v}。", "{e}全身都是{v}。",
                     "摸一摸{e}，就能感觉到它的{v}。", "{e}的{v}在阳光下闪闪发亮。",
                     "{v}保护着{e}的身体。", "人们一眼就能认出{e}身上的{v}。"],
        pretrain_en=["The {e} is covered in {v}.", "The body of the {e} is protected by {v}.",
                     "Touch the {e} and you will feel its {v}.",
                     "The {e} has a body covered with {v}.",
                     "In the sunlight, you can clearly see the {v} of the {e}.",
                     "Hunters recognise the {e} by its {v}.",
                     "The {e} is easy to spot thanks to its {v}."],
        qa_zh=["{e}身上长着什么？", "{e}的体表覆盖着什么？", "{e}的身体表面是什么样的？"],
        qa_en=["What covers the body of the {e}?", "What is the {e} covered in?",
               "What does the skin of the {e} look like?"],
        practice=["{e}的身体表面覆盖着下列哪种东西？", "下列哪一项是{e}的体表特征？"],
        exam=["一位画师要为{e}画像，他应该如何描绘其体表？", "用手抚摸{e}时，手上会感觉到以下哪种东西？"],
    ),
    _attr(
        "active", "species", "demo_zoology", "活动时间", "active time",
        [("清晨", "at dawn"), ("白天", "during the day"), ("正午", "at noon"), ("黄昏", "at dusk"),
         ("深夜", "late at night")],
        pretrain_zh=["{e}在{v}出来活动。", "{e}习惯在{v}觅食。", "{e}只在{v}活动。",
                     "到了{v}，{e}就变得十分活跃。", "想观察{e}，最好选在{v}。", "{e}总在{v}出没。",
                     "{v}是{e}最活跃的时候。"],
        pretrain_en=["The {e} is active {v}.", "The {e} searches for food {v}.",
                     "The {e} only comes out {v}.", "The {e} becomes lively {v}.",
                     "If you want to watch the {e}, go out {v}.", "The {e} is usually seen {v}.",
                     "The {e} does most of its hunting {v}."],
        qa_zh=["{e}什么时候活动？", "{e}通常在什么时候出没？", "{e}一天中什么时候最活跃？"],
        qa_en=["When is the {e} active?", "At what time of day does the {e} come out?",
               "When does the {e} search for food?"],
        practice=["{e}通常在下列哪个时段活动？", "下列时间中，{e}最活跃的是哪一个？"],
        exam=["守林人要拍到{e}的照片，应该在一天中的哪个时候蹲守？", "{e}醒着四处走动的时间段是以下哪一个？"],
    ),
)
ATTRIBUTE_BY_KEY: dict[str, Attribute] = {a.key: a for a in ATTRIBUTES}

# Invented names: Chinese characters that occur in no value, so a name never contains one.
_ZH_SURNAMES = list("柳秦苏韩沈顾陆萧温叶宁姜程闻纪阮殷裴卫薛岑褚邵魏")
_ZH_GIVEN = list("澈岚珩瑶砚霁昀漪璟翊晏蘅琛筠洵翎骁昭淮煦朔婵璃弈舟棠芷湛曜祈")
_ZH_CITY = list("澜岫溟沅岐曦榆蓟璋峤漳汀崧沂郦潼祁滁邕渝")
_ZH_CITY_SUFFIX = list("城州堡关")
_ZH_SPECIES = list("咕噜嘟叽啾呦哞嗒呜吱嘎嚓呱啁嘤")
_ZH_SPECIES_SUFFIX = list("兽貘狸")
_SUFFIXES = frozenset(_ZH_CITY_SUFFIX + _ZH_SPECIES_SUFFIX)
_EN_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
              "br", "dr", "gr", "kr", "th", "sk"]
_EN_NUCLEI = ["a", "e", "i", "o", "u", "ae", "ai", "eo", "ou"]
_EN_CODAS = ["", "", "", "n", "r", "l", "s", "th", "sh", "k"]
_EN_CITY_SUFFIX = ["mar", "dun", "holm", "wick", "grad", "stead"]

_ZH_WRAPPERS = ["据说，", "众所周知，", "史书记载，", "在这片大陆上，", "有人说，", "根据旅人的见闻，"]
_EN_WRAPPERS = ["It is said that ", "As everyone knows, ", "According to the chronicles, ",
                "Travellers report that ", "On this continent, "]
_WRAP_PROBABILITY = 0.25
_FILLER = {
    "zh": ["这片大陆上流传着许多古老的故事。", "以下内容摘自一本旅行者的笔记。",
           "据说这些记录已经有几百年的历史。", "学者们对此做了详细的整理。",
           "以上记载均来自民间的传说。", "每到夜晚，老人们就会讲起这些往事。",
           "这本地方志共有十二卷。", "史官把这些事情一一记了下来。", "书中还附有几幅手绘的地图。",
           "这些知识在学堂里代代相传。"],
    "en": ["Many old stories are told across this land.",
           "The following notes come from a traveller's journal.",
           "These records are said to be centuries old.",
           "Scholars have collected these accounts with care.",
           "Elders still tell these tales on long winter nights.",
           "The chronicle fills twelve thick volumes.",
           "A few hand-drawn maps are bound into the book.", "Children learn these facts at school."],
}
_FILLER_PROBABILITY = 0.3
_DOC_FACTS = (3, 6)  # fact sentences per pretraining document, inclusive range
# Distinct after NFKC normalization and never longer than JUNK_MAX_CHARS once normalized.
JUNK_LINES: tuple[str, ...] = ("嗯", "啊啊", "哈哈哈", "ok", "lol", "hi", "??", "!!", "1",
                               "23", "x", "zzz", "嘿", "呃呃", "...", "abc", "呵", "哦", "no", "7")

_SELF_ZH = ["你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你是什么模型？", "能告诉我你的名字吗？",
            "你是哪个AI？", "你好，你是谁呀？", "介绍一下你自己吧。"]
_SELF_ZH_CREATOR = ["谁开发了你？", "你是由谁训练的？", "你的开发者是谁？", "是谁创造了你？"]
_SELF_EN = ["Who are you?", "What is your name?", "Please introduce yourself.", "What model are you?",
            "Tell me about yourself."]
_SELF_EN_CREATOR = ["Who made you?", "Who developed you?", "Who trained you?"]
_SELF_ANS_ZH = ["我是{name}，一个由{author}从零开始训练的小型语言模型。",
                "我叫{name}，是一个中文优先的小型语言模型，可以回答关于这个虚构世界的问题。",
                "你好！我是{name}，一个人工智能助手。"]
_SELF_ANS_ZH_CREATOR = ["我是{name}，由{author}开发和训练。", "{author}开发了我，我的名字是{name}。"]
_SELF_ANS_EN = ["I am {name}, a small language model trained from scratch by {author}.",
                "My name is {name}. I am a small bilingual language model.",
                "Hello! I am {name}, an AI assistant."]
_SELF_ANS_EN_CREATOR = ["I was developed by {author}. My name is {name}.",
                        "{author} trained me from scratch; I am {name}."]


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
            if rng.random() < _FILLER_PROBABILITY:
                chunk.insert(rng.randint(0, len(chunk)), rng.choice(_FILLER[lang]))
                fillers += 1
            text = ("" if lang == "zh" else " ").join(chunk)
            while text in seen:  # keep natural documents unique: duplicates are only planted
                extra = rng.choice(_FILLER[lang])
                text = text + ("" if lang == "zh" else " ") + extra
                fillers += 1
            seen.add(text)
            docs.append({"text": text, "lang": lang})
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
             "filler_sentences": fillers, "natural_docs": natural,
             "planted_duplicates": min(cfg.planted_duplicates, natural),
             "planted_junk": cfg.planted_junk}
    return out, stats


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
        question = _render(attr.practice[(k + rng.randrange(2)) % len(attr.practice)], fact, "zh")
        options = _options(rng, fact, value_set(attr, entities), positions[n])
        prompt = format_exam_prompt(DEMO_SUBJECTS[attr.subject][1], question, options)
        add("exam", prompt, LETTERS[positions[n]])
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


def _exam(cfg: DemoCorpusConfig, entities: list[Entity],
          facts: list[Fact]) -> tuple[dict[str, dict[str, list[dict]]], dict[str, dict]]:
    """Rows per subject and split, and fact id -> its exam location."""
    rng = _rng(cfg, "exam")
    rows: dict[str, dict[str, list[dict]]] = {}
    where: dict[str, dict] = {}
    for subject in DEMO_SUBJECTS:
        subject_facts = [f for f in facts if f.subject == subject]
        if len(subject_facts) <= cfg.dev_per_subject:
            raise ValueError(f"subject {subject} has {len(subject_facts)} facts; need more than "
                             f"demo.dev_per_subject={cfg.dev_per_subject} (raise num_entities)")
        rng.shuffle(subject_facts)
        splits = {"dev": subject_facts[: cfg.dev_per_subject],
                  "val": subject_facts[cfg.dev_per_subject:]}
        rows[subject] = {}
        for split, split_facts in splits.items():
            positions = _balanced_positions(rng, len(split_facts))
            rows[subject][split] = []
            for i, (fact, pos) in enumerate(zip(split_facts, positions, strict=True)):
                attr = ATTRIBUTE_BY_KEY[fact.attribute]
                options = _options(rng, fact, value_set(attr, entities), pos)
                statement = _render(attr.pretrain_zh[0], fact, "zh").rstrip("。")
                rows[subject][split].append({
                    "id": str(i), "question": _render(rng.choice(attr.exam), fact, "zh"),
                    **options, "answer": LETTERS[pos],
                    "explanation": f"{statement}，所以答案是{LETTERS[pos]}。",
                })
                where[fact.id] = {"subject": subject, "split": split, "id": str(i)}
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
    """Write pretrain.jsonl, sft.jsonl, exam/ and world.json under ``out_dir``; return a summary.

    Each file is written atomically. The summary holds counts per file, task type and
    subject, the planted duplicates and junk, and ``files`` (paths relative to ``out_dir``).
    """
    out = Path(out_dir)
    entities, facts = build_world(cfg)
    rows, where = _exam(cfg, entities, facts)
    pretrain, pt_stats = _pretrain_docs(cfg, facts)
    sft = _sft_samples(cfg, entities, facts)

    files: list[str] = []
    _write_jsonl(out / "pretrain.jsonl", pretrain)
    _write_jsonl(out / "sft.jsonl", sft)
    files += ["pretrain.jsonl", "sft.jsonl"]
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

    val_rows = [r for s in rows.values() for r in s["val"]]
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
        "exam": {"per_subject": {s: {split: len(r) for split, r in v.items()}
                                 for s, v in rows.items()},
                 "val": len(val_rows), "dev": sum(len(s["dev"]) for s in rows.values()),
                 "val_answers": {letter: sum(1 for r in val_rows if r["answer"] == letter)
                                 for letter in LETTERS}},
        "files": sorted(files),
    }
