"""The phrasing tables of the demo world: every template, value list and fixed text.

``steelworks.data.demo_corpus`` (the generator) draws everything it writes from here: the
exam layout constants (``LETTERS``, ``EXAM_COLUMNS``; the prompt is ``data.exam_prompt``), the
subjects (``DEMO_SUBJECTS``), the entity kinds, one ``Attribute`` per fact type with its closed
value set and its four template families, the parts invented names are built from, the
wrappers and filler sentences of pretraining documents, the self-cognition questions and
answers, and the planted ``JUNK_LINES``.

Each ``Attribute`` keeps four template families that must never share a sentence:
pretraining declaratives (``pretrain_zh`` / ``pretrain_en``), chat-QA questions (``qa_zh`` /
``qa_en``), SFT practice exam questions (``practice``) and the scored EXAM questions
(``exam``). In particular the exam templates must stay disjoint from the pretraining, QA and
practice ones, so the exam measures knowing the fact, not recalling the string. Editing any
table here changes the generated corpus (the output is a pure function of these tables and
the config).
"""

from __future__ import annotations

from dataclasses import dataclass

LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
EXAM_COLUMNS: tuple[str, ...] = ("id", "question", "A", "B", "C", "D", "answer", "explanation")
# The data stage's default ``min_chars`` is 5: planted junk lines are at most this long.
JUNK_MAX_CHARS = 4


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
        qa_zh=["{e}的家乡是哪里？", "{e}是哪里人？", "{e}出生在哪座城市？", "请问{e}的老家在哪儿？",
               "你知道{e}来自哪座城市吗？", "哪座城市是{e}的故乡？", "{e}是在什么地方长大的？",
               "敢问{e}祖籍何处？"],
        qa_en=["Where is {e} from?", "What is the hometown of {e}?", "In which city was {e} born?",
               "Which city does {e} come from?", "Where did {e} grow up?"],
        practice=["{e}的故乡是下列哪座城市？", "{e}是在哪座城市出生的？",
                  "{e}的家乡是下列哪座城市？", "{e}来自下列哪座城市？", "{e}的老家在以下哪座城市？",
                  "关于{e}的家乡，下列哪项正确？", "{e}是土生土长的下列哪座城市的人？",
                  "{e}从小在下列哪座城市长大？"],
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
        qa_zh=["{e}的职业是什么？", "{e}是做什么工作的？", "{e}靠什么谋生？",
               "请问{e}做的是什么工作？", "你知道{e}的职业吗？", "{e}是靠什么养家糊口的？",
               "{e}的本职工作是什么？", "敢问{e}以何为业？"],
        qa_en=["What does {e} do for a living?", "What is the profession of {e}?",
               "What job does {e} have?", "What kind of work does {e} do?",
               "How does {e} earn a living?"],
        practice=["{e}的工作是下列哪一种？", "{e}从事下列哪种职业？", "{e}的职业是下列哪一种？",
                  "{e}靠下列哪种工作谋生？", "下列职业中，哪一种属于{e}？",
                  "关于{e}的职业，下列哪项正确？", "{e}以下列哪种职业为生？",
                  "{e}多年来一直做下列哪种工作？"],
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
        qa_zh=["{e}最喜欢什么颜色？", "{e}偏爱哪种颜色？", "{e}最爱的颜色是什么？",
               "请问{e}最钟爱哪种颜色？", "哪种颜色是{e}的最爱？", "你知道{e}喜欢什么颜色吗？",
               "哪种颜色最得{e}的偏爱？", "说到颜色，{e}最喜欢哪一种？"],
        qa_en=["What is {e}'s favourite colour?", "Which colour does {e} like best?",
               "What colour does {e} love most?", "Which colour is {e}'s favourite?",
               "What colour does {e} prefer above all others?"],
        practice=["{e}最喜欢下列哪种颜色？", "下列颜色中，{e}最偏爱哪一种？",
                  "{e}最爱下列哪种颜色？", "下列哪种颜色是{e}的最爱？", "{e}偏爱下列哪一种颜色？",
                  "关于{e}最喜欢的颜色，下列哪项正确？", "{e}的衣服大多是下列哪种颜色的？",
                  "{e}对下列哪种颜色情有独钟？"],
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
        qa_zh=["{e}最喜欢吃什么水果？", "{e}最爱的水果是什么？", "哪种水果是{e}的最爱？",
               "请问{e}最爱哪种水果？", "你知道{e}喜欢吃什么水果吗？", "{e}偏爱哪一种水果？",
               "在各种水果里，{e}最喜欢哪个？", "哪一种水果最合{e}的口味？"],
        qa_en=["What is {e}'s favourite fruit?", "Which fruit does {e} like best?",
               "What fruit does {e} love to eat?", "Which fruit is {e}'s favourite?",
               "What fruit does {e} enjoy most?"],
        practice=["{e}最爱吃下列哪种水果？", "下列水果中，{e}最喜欢哪一种？",
                  "{e}最喜欢的水果是下列哪一种？", "下列哪种水果是{e}的最爱？",
                  "{e}每天都要吃下列哪种水果？", "关于{e}最爱的水果，下列哪项正确？",
                  "{e}去集市时总会买下列哪种水果？", "在下列水果中，{e}最偏爱哪个？"],
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
        qa_zh=["哪条河流经{e}？", "{e}坐落在哪条河边？", "{e}的母亲河是哪一条？",
               "请问{e}位于哪条河的岸边？", "{e}的百姓喝的是哪条河的水？",
               "你知道哪条河从{e}流过吗？", "{e}旁边的那条河叫什么名字？",
               "{e}的码头建在哪条江河上？"],
        qa_en=["Which river flows through {e}?", "On which river does {e} lie?",
               "What is the mother river of {e}?", "What river runs past {e}?",
               "Which river is {e} built beside?"],
        practice=["流经{e}的是下列哪条河？", "{e}建在下列哪条河的岸边？", "下列哪条河流经{e}？",
                  "{e}的母亲河是下列哪一条？", "{e}坐落在下列哪条河畔？",
                  "关于流经{e}的河流，下列哪项正确？", "{e}的码头建在下列哪条河边？",
                  "{e}的居民世代饮用下列哪条河的水？"],
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
        qa_zh=["{e}的气候怎么样？", "{e}的天气有什么特点？", "{e}是什么样的气候？",
               "请问{e}的气候属于哪种类型？", "你知道{e}的天气通常怎么样吗？",
               "哪种气候最能代表{e}？", "{e}那边的天气一般是什么样？", "{e}以哪种气候闻名？"],
        qa_en=["What is the climate of {e} like?", "What is the weather like in {e}?",
               "How would you describe the climate of {e}?",
               "What kind of weather does {e} usually have?",
               "What kind of climate is {e} known for?"],
        practice=["{e}的气候属于下列哪一种？", "下列哪一项描述了{e}的天气？",
                  "{e}的天气通常是下列哪种情况？", "下列哪个词最能形容{e}的气候？",
                  "下列哪一项是{e}常年的天气？", "关于{e}的气候，下列说法正确的是？",
                  "{e}以下列哪种气候著称？", "下列哪种气候特征属于{e}？"],
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
        qa_zh=["{e}位于哪个地区？", "{e}在大陆的什么地方？", "{e}地处何方？", "请问{e}在哪个地区？",
               "{e}在大陆的什么方位？", "你知道{e}位于哪里吗？", "在地图上，{e}处在什么位置？",
               "{e}是哪个地区的城市？"],
        qa_en=["Where is {e} located?", "In which region does {e} lie?",
               "Which part of the continent is {e} in?", "What region is {e} in?",
               "In what part of the land does {e} stand?"],
        practice=["{e}位于下列哪个地区？", "在地图上，{e}应该在下列哪个地区？",
                  "{e}地处下列哪个地区？", "{e}坐落在大陆的下列哪个地方？",
                  "关于{e}的位置，下列哪项正确？", "下列哪个地区是{e}的所在地？",
                  "要去{e}，得先到下列哪个地区？", "{e}是下列哪个地区的城市？"],
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
        qa_zh=["{e}的特产是什么？", "{e}以什么闻名？", "去{e}应该买什么特产？", "请问{e}出产什么？",
               "{e}最有名的东西是什么？", "你知道{e}有什么特产吗？", "商人们去{e}通常采购什么？",
               "说到{e}，人们会想到哪种货物？"],
        qa_en=["What is {e} famous for?", "What is the main product of {e}?",
               "What do merchants buy in {e}?", "What goods is {e} best known for?",
               "What does {e} produce?"],
        practice=["{e}最有名的特产是下列哪一项？", "下列物产中，哪一种是{e}的特产？",
                  "{e}的特产是下列哪一种？", "{e}以出产下列哪种东西闻名？",
                  "商人们常去{e}采购下列哪种货物？", "关于{e}的特产，下列哪项正确？",
                  "下列哪种货物产自{e}并销往各地？", "{e}的集市上到处都在卖下列哪种东西？"],
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
        qa_zh=["{e}生活在哪里？", "{e}的栖息地是什么？", "在哪里能找到{e}？",
               "请问{e}栖息在什么样的环境中？", "{e}的家在哪儿？", "你知道{e}住在哪种环境里吗？",
               "哪种环境是{e}的家园？", "{e}平常待在哪儿？"],
        qa_en=["Where does the {e} live?", "What is the habitat of the {e}?",
               "Where can you find the {e}?", "In what kind of place does the {e} make its home?",
               "Where is the {e} usually found?"],
        practice=["{e}栖息在下列哪种环境中？", "下列哪里最可能见到{e}？",
                  "{e}的栖息地是下列哪一种？", "{e}生活在下列哪种环境里？",
                  "下列哪种环境是{e}的家？", "关于{e}的栖息地，下列哪项正确？",
                  "在下列哪种环境中最容易遇见{e}？", "{e}世代生活在下列哪种环境中？"],
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
        qa_zh=["{e}吃什么？", "{e}以什么为食？", "{e}的主食是什么？", "请问{e}主要吃什么？",
               "{e}最爱吃的是什么？", "你知道{e}靠吃什么活下去吗？", "哪种食物是{e}的最爱？",
               "{e}每天的食物是什么？"],
        qa_en=["What does the {e} eat?", "What is the main food of the {e}?",
               "What does the {e} feed on?", "What food does the {e} live on?",
               "What is the favourite food of the {e}?"],
        practice=["{e}主要以下列哪种食物为生？", "下列食物中，{e}最常吃的是哪一种？",
                  "{e}以下列哪一样为主要食物？", "{e}的主食是下列哪一种？",
                  "下列哪种食物是{e}最爱吃的？", "关于{e}的食性，下列哪项正确？",
                  "{e}每天主要吃下列哪一样？", "{e}靠吃下列哪一样维持生存？"],
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
        qa_zh=["{e}身上长着什么？", "{e}的体表覆盖着什么？", "{e}的身体表面是什么样的？",
               "请问{e}身上覆盖着什么？", "{e}的外表长什么样？", "你知道{e}的体表是什么吗？",
               "{e}全身长满了什么？", "什么东西保护着{e}的身体？"],
        qa_en=["What covers the body of the {e}?", "What is the {e} covered in?",
               "What does the skin of the {e} look like?",
               "What kind of covering does the {e} have?", "What protects the body of the {e}?"],
        practice=["{e}的身体表面覆盖着下列哪种东西？", "下列哪一项是{e}的体表特征？",
                  "{e}的身上长满了下列哪一种？", "{e}全身覆盖着下列哪一种？",
                  "下列哪一项保护着{e}的身体？", "关于{e}的体表，下列哪项正确？",
                  "人们凭下列哪种特征一眼认出{e}？", "{e}的体表长的是下列哪一种？"],
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
        qa_zh=["{e}什么时候活动？", "{e}通常在什么时候出没？", "{e}一天中什么时候最活跃？",
               "请问{e}在什么时候出来活动？", "{e}习惯在什么时候觅食？", "你知道{e}何时最活跃吗？",
               "什么时段最容易见到{e}？", "{e}一般几时出没？"],
        qa_en=["When is the {e} active?", "At what time of day does the {e} come out?",
               "When does the {e} search for food?", "What time of day is the {e} most lively?",
               "When is the best time to see the {e}?"],
        practice=["{e}通常在下列哪个时段活动？", "下列时间中，{e}最活跃的是哪一个？",
                  "{e}习惯在下列哪个时辰觅食？", "{e}总在下列什么时候出没？",
                  "下列哪一时刻是{e}最活跃的时候？", "关于{e}的活动时间，下列哪项正确？",
                  "想见到{e}，最好选在下列何时？", "{e}只在下列哪段时间出来活动？"],
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
