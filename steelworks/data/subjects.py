"""Subject facts of C-Eval and CMMLU: names, categories and group flags, not the questions.

Generated from ``../shared/benchmarks`` (``ceval/subject_mapping.json``, the file the C-Eval
repository ships, and ``cmmlu/subjects.json``, CMMLU's own subject -> category map) and kept
as Python so the package needs no data files.  The facts are public metadata of the two
benchmarks; the questions themselves (CMMLU: CC BY-NC-SA 4.0) are never copied here.

They are packaged because a benchmark directory need not carry its map: the official
``ceval-exam.zip`` holds only CSVs, and CMMLU's data folders have no category file, yet a
report without categories (STEM / Social Science / Humanities / Other), C-Eval Hard or
CMMLU's China-specific group is not comparable with the papers' tables.
"""

from __future__ import annotations

from typing import NamedTuple

CATEGORIES: tuple[str, ...] = ("STEM", "Social Science", "Humanities", "Other")


class CevalSubjectInfo(NamedTuple):
    name_en: str
    name_zh: str
    category: str


class CmmluSubjectInfo(NamedTuple):
    name_zh: str
    category: str
    subcategories: tuple[str, ...]  # CMMLU's finer labels, e.g. ("linguistics", "china specific")
    china_specific: bool  # about China itself (law, history, customs): CMMLU reports it apart


# C-Eval: 52 subjects in the order of subject_mapping.json.
CEVAL_SUBJECTS: dict[str, CevalSubjectInfo] = {
    "computer_network": CevalSubjectInfo("Computer Network", "计算机网络", "STEM"),
    "operating_system": CevalSubjectInfo("Operating System", "操作系统", "STEM"),
    "computer_architecture": CevalSubjectInfo("Computer Architecture", "计算机组成", "STEM"),
    "college_programming": CevalSubjectInfo("College Programming", "大学编程", "STEM"),
    "college_physics": CevalSubjectInfo("College Physics", "大学物理", "STEM"),
    "college_chemistry": CevalSubjectInfo("College Chemistry", "大学化学", "STEM"),
    "advanced_mathematics": CevalSubjectInfo("Advanced Mathematics", "高等数学", "STEM"),
    "probability_and_statistics": CevalSubjectInfo(
        "Probability and Statistics", "概率统计", "STEM"
    ),
    "discrete_mathematics": CevalSubjectInfo("Discrete Mathematics", "离散数学", "STEM"),
    "electrical_engineer": CevalSubjectInfo("Electrical Engineer", "注册电气工程师", "STEM"),
    "metrology_engineer": CevalSubjectInfo("Metrology Engineer", "注册计量师", "STEM"),
    "high_school_mathematics": CevalSubjectInfo("High School Mathematics", "高中数学", "STEM"),
    "high_school_physics": CevalSubjectInfo("High School Physics", "高中物理", "STEM"),
    "high_school_chemistry": CevalSubjectInfo("High School Chemistry", "高中化学", "STEM"),
    "high_school_biology": CevalSubjectInfo("High School Biology", "高中生物", "STEM"),
    "middle_school_mathematics": CevalSubjectInfo("Middle School Mathematics", "初中数学", "STEM"),
    "middle_school_biology": CevalSubjectInfo("Middle School Biology", "初中生物", "STEM"),
    "middle_school_physics": CevalSubjectInfo("Middle School Physics", "初中物理", "STEM"),
    "middle_school_chemistry": CevalSubjectInfo("Middle School Chemistry", "初中化学", "STEM"),
    "veterinary_medicine": CevalSubjectInfo("Veterinary Medicine", "兽医学", "STEM"),
    "college_economics": CevalSubjectInfo("College Economics", "大学经济学", "Social Science"),
    "business_administration": CevalSubjectInfo(
        "Business Administration", "工商管理", "Social Science"
    ),
    "marxism": CevalSubjectInfo("Marxism", "马克思主义基本原理", "Social Science"),
    "mao_zedong_thought": CevalSubjectInfo(
        "Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"
    ),
    "education_science": CevalSubjectInfo("Education Science", "教育学", "Social Science"),
    "teacher_qualification": CevalSubjectInfo(
        "Teacher Qualification", "教师资格", "Social Science"
    ),
    "high_school_politics": CevalSubjectInfo("High School Politics", "高中政治", "Social Science"),
    "high_school_geography": CevalSubjectInfo(
        "High School Geography", "高中地理", "Social Science"
    ),
    "middle_school_politics": CevalSubjectInfo(
        "Middle School Politics", "初中政治", "Social Science"
    ),
    "middle_school_geography": CevalSubjectInfo(
        "Middle School Geography", "初中地理", "Social Science"
    ),
    "modern_chinese_history": CevalSubjectInfo(
        "Modern Chinese History", "近代史纲要", "Humanities"
    ),
    "ideological_and_moral_cultivation": CevalSubjectInfo(
        "Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"
    ),
    "logic": CevalSubjectInfo("Logic", "逻辑学", "Humanities"),
    "law": CevalSubjectInfo("Law", "法学", "Humanities"),
    "chinese_language_and_literature": CevalSubjectInfo(
        "Chinese Language and Literature", "中国语言文学", "Humanities"
    ),
    "art_studies": CevalSubjectInfo("Art Studies", "艺术学", "Humanities"),
    "professional_tour_guide": CevalSubjectInfo(
        "Professional Tour Guide", "导游资格", "Humanities"
    ),
    "legal_professional": CevalSubjectInfo("Legal Professional", "法律职业资格", "Humanities"),
    "high_school_chinese": CevalSubjectInfo("High School Chinese", "高中语文", "Humanities"),
    "high_school_history": CevalSubjectInfo("High School History", "高中历史", "Humanities"),
    "middle_school_history": CevalSubjectInfo("Middle School History", "初中历史", "Humanities"),
    "civil_servant": CevalSubjectInfo("Civil Servant", "公务员", "Other"),
    "sports_science": CevalSubjectInfo("Sports Science", "体育学", "Other"),
    "plant_protection": CevalSubjectInfo("Plant Protection", "植物保护", "Other"),
    "basic_medicine": CevalSubjectInfo("Basic Medicine", "基础医学", "Other"),
    "clinical_medicine": CevalSubjectInfo("Clinical Medicine", "临床医学", "Other"),
    "urban_and_rural_planner": CevalSubjectInfo(
        "Urban and Rural Planner", "注册城乡规划师", "Other"
    ),
    "accountant": CevalSubjectInfo("Accountant", "注册会计师", "Other"),
    "fire_engineer": CevalSubjectInfo("Fire Engineer", "注册消防工程师", "Other"),
    "environmental_impact_assessment_engineer": CevalSubjectInfo(
        "Environmental Impact Assessment Engineer", "环境影响评价工程师", "Other"
    ),
    "tax_accountant": CevalSubjectInfo("Tax Accountant", "税务师", "Other"),
    "physician": CevalSubjectInfo("Physician", "医师资格", "Other"),
}

# C-Eval "Hard": the eight subjects the C-Eval paper singles out as needing advanced reasoning.
CEVAL_HARD_SUBJECTS: frozenset[str] = frozenset(
    {
        "advanced_mathematics",
        "discrete_mathematics",
        "probability_and_statistics",
        "college_chemistry",
        "college_physics",
        "high_school_mathematics",
        "high_school_chemistry",
        "high_school_physics",
    }
)

# CMMLU: 67 subjects, alphabetical as in its map.  Each has exactly one category there.
CMMLU_SUBJECTS: dict[str, CmmluSubjectInfo] = {
    "agronomy": CmmluSubjectInfo("农学", "Other", ("other",), False),
    "anatomy": CmmluSubjectInfo("解剖学", "STEM", ("biology",), False),
    "ancient_chinese": CmmluSubjectInfo(
        "古汉语", "Social Science", ("linguistics", "china specific"), True
    ),
    "arts": CmmluSubjectInfo("艺术学", "Humanities", ("arts",), False),
    "astronomy": CmmluSubjectInfo("天文学", "STEM", ("physics",), False),
    "business_ethics": CmmluSubjectInfo("商业伦理", "Social Science", ("business",), False),
    "chinese_civil_service_exam": CmmluSubjectInfo(
        "中国公务员考试", "Social Science", ("politics", "china specific"), True
    ),
    "chinese_driving_rule": CmmluSubjectInfo(
        "中国驾驶规则", "Other", ("other", "china specific"), True
    ),
    "chinese_food_culture": CmmluSubjectInfo(
        "中国饮食文化", "Social Science", ("culture", "china specific"), True
    ),
    "chinese_foreign_policy": CmmluSubjectInfo(
        "中国外交政策", "Social Science", ("politics", "china specific"), True
    ),
    "chinese_history": CmmluSubjectInfo(
        "中国历史", "Humanities", ("history", "china specific"), True
    ),
    "chinese_literature": CmmluSubjectInfo(
        "中国文学", "Humanities", ("literature", "china specific"), True
    ),
    "chinese_teacher_qualification": CmmluSubjectInfo(
        "中国教师资格", "Social Science", ("education", "china specific"), True
    ),
    "college_actuarial_science": CmmluSubjectInfo("大学精算学", "STEM", ("math",), False),
    "college_education": CmmluSubjectInfo("大学教育学", "Social Science", ("education",), False),
    "college_engineering_hydrology": CmmluSubjectInfo(
        "大学工程水文学", "STEM", ("engineering",), False
    ),
    "college_law": CmmluSubjectInfo("大学法律", "Humanities", ("law",), False),
    "college_mathematics": CmmluSubjectInfo("大学数学", "STEM", ("math",), False),
    "college_medical_statistics": CmmluSubjectInfo("大学医学统计", "STEM", ("statistics",), False),
    "clinical_knowledge": CmmluSubjectInfo("临床知识", "Other", ("other",), False),
    "college_medicine": CmmluSubjectInfo("大学医学", "Other", ("other",), False),
    "computer_science": CmmluSubjectInfo("计算机科学", "STEM", ("computer science",), False),
    "computer_security": CmmluSubjectInfo("计算机安全", "Other", ("other",), False),
    "conceptual_physics": CmmluSubjectInfo("概念物理学", "STEM", ("physics",), False),
    "construction_project_management": CmmluSubjectInfo(
        "建设工程管理", "Other", ("other", "china specific"), True
    ),
    "economics": CmmluSubjectInfo("经济学", "Social Science", ("economics",), False),
    "education": CmmluSubjectInfo("教育学", "Social Science", ("education",), False),
    "elementary_chinese": CmmluSubjectInfo(
        "小学语文", "Social Science", ("linguistics", "china specific"), True
    ),
    "elementary_commonsense": CmmluSubjectInfo(
        "小学常识", "Other", ("other", "china specific"), True
    ),
    "elementary_information_and_technology": CmmluSubjectInfo(
        "小学信息技术", "Other", ("other",), False
    ),
    "electrical_engineering": CmmluSubjectInfo("电气工程", "STEM", ("engineering",), False),
    "elementary_mathematics": CmmluSubjectInfo("初等数学", "STEM", ("math",), False),
    "ethnology": CmmluSubjectInfo("民族学", "Social Science", ("culture", "china specific"), True),
    "food_science": CmmluSubjectInfo("食品科学", "Other", ("other",), False),
    "genetics": CmmluSubjectInfo("遗传学", "STEM", ("biology",), False),
    "global_facts": CmmluSubjectInfo("全球事实", "Humanities", ("global",), False),
    "high_school_biology": CmmluSubjectInfo("高中生物", "STEM", ("biology",), False),
    "high_school_chemistry": CmmluSubjectInfo("高中化学", "STEM", ("chemistry",), False),
    "high_school_geography": CmmluSubjectInfo("高中地理", "Social Science", ("geography",), False),
    "high_school_mathematics": CmmluSubjectInfo("高中数学", "STEM", ("math",), False),
    "high_school_physics": CmmluSubjectInfo("高中物理学", "STEM", ("physics",), False),
    "high_school_politics": CmmluSubjectInfo(
        "高中政治", "Social Science", ("politics", "china specific"), True
    ),
    "human_sexuality": CmmluSubjectInfo("人类性行为", "Other", ("other",), False),
    "international_law": CmmluSubjectInfo("国际法学", "Humanities", ("law",), False),
    "journalism": CmmluSubjectInfo("新闻学", "Social Science", ("sociology",), False),
    "jurisprudence": CmmluSubjectInfo("法理学", "Humanities", ("law",), False),
    "legal_and_moral_basis": CmmluSubjectInfo("法律与道德基础", "Other", ("other",), False),
    "logical": CmmluSubjectInfo("逻辑学", "Humanities", ("philosophy",), False),
    "machine_learning": CmmluSubjectInfo("机器学习", "STEM", ("computer science",), False),
    "management": CmmluSubjectInfo("管理学", "Social Science", ("business",), False),
    "marketing": CmmluSubjectInfo("市场营销", "Social Science", ("business",), False),
    "marxist_theory": CmmluSubjectInfo("马克思主义理论", "Humanities", ("philosophy",), False),
    "modern_chinese": CmmluSubjectInfo(
        "现代汉语", "Social Science", ("linguistics", "china specific"), True
    ),
    "nutrition": CmmluSubjectInfo("营养学", "Other", ("other",), False),
    "philosophy": CmmluSubjectInfo("哲学", "Humanities", ("philosophy",), False),
    "professional_accounting": CmmluSubjectInfo("专业会计", "Social Science", ("business",), False),
    "professional_law": CmmluSubjectInfo("专业法学", "Humanities", ("law",), False),
    "professional_medicine": CmmluSubjectInfo("专业医学", "Other", ("other",), False),
    "professional_psychology": CmmluSubjectInfo(
        "专业心理学", "Social Science", ("psychology",), False
    ),
    "public_relations": CmmluSubjectInfo("公共关系", "Social Science", ("politics",), False),
    "security_study": CmmluSubjectInfo("安全研究", "Social Science", ("politics",), False),
    "sociology": CmmluSubjectInfo("社会学", "Social Science", ("culture",), False),
    "sports_science": CmmluSubjectInfo("体育学", "Other", ("other",), False),
    "traditional_chinese_medicine": CmmluSubjectInfo(
        "中医中药", "Other", ("other", "china specific"), True
    ),
    "virology": CmmluSubjectInfo("病毒学", "STEM", ("biology",), False),
    "world_history": CmmluSubjectInfo("世界历史", "Humanities", ("history",), False),
    "world_religions": CmmluSubjectInfo("世界宗教", "Humanities", ("global",), False),
}

CMMLU_CHINA_SPECIFIC: frozenset[str] = frozenset(
    name for name, info in CMMLU_SUBJECTS.items() if info.china_specific
)
