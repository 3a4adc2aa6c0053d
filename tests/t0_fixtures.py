"""Small local copies of the T0 datasets in their real Hugging Face schemas, for tests.

Each dataset's features are the ones its loading script declares (huggingface/datasets,
``datasets/<name>/<name>.py`` as last there before the scripts moved to the hub; the hub's
copies are taken to keep them). TREC is in that current schema (``coarse_label``, ``fine_label``
with 50 fine classes); T0 and promptsource's templates were written against TREC 1.x
(``label-coarse``, ``label-fine`` with 47). WikiHop's script names the query ``question`` (its
dataset card says ``query``). The rows are made up, deterministic (seeded by dataset, split and
index), and a few of them cover every label value and every branch the promptsource templates
take. ``build`` writes every split a T0 run reads where ``sources.local_path`` looks for it.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Callable

import datasets
from datasets import ClassLabel, Features, Sequence, Value

from tensorpoly_jax.data import sources, t0

STR, INT32 = Value("string"), Value("int32")

PEOPLE = ("Amara Okafor", "Bruno Keller", "Chen Wei", "Dana Levi", "Elif Demir", "Farid Haddad",
          "Greta Lind", "Hiro Tanaka", "Ines Duarte", "Jonas Berg", "Kavya Rao", "Lucia Moreno")
PLACES = ("Lisbon", "Nairobi", "Osaka", "Quebec City", "Valparaiso", "Tromso", "Marrakesh",
          "Adelaide")
THINGS = ("an old violin", "a red bicycle", "a hand-drawn map", "a basket of plums", "a paper kite",
          "a brass telescope", "a wool blanket", "a cracked teapot")
VERBS = ("repaired", "borrowed", "painted", "sold", "found", "carried", "photographed", "wrapped")


class Draw(random.Random):
  """Row ``index`` of a split: its index, its split, and random text seeded by all three."""

  def __init__(self, seed: str, index: int, split: str):
    super().__init__(seed)
    self.index, self.split = index, split

  def person(self) -> str:
    return self.choice(PEOPLE)

  def first_name(self) -> str:
    return self.person().split()[0]

  def place(self) -> str:
    return self.choice(PLACES)

  def thing(self) -> str:
    return self.choice(THINGS)

  def verb(self) -> str:
    return self.choice(VERBS)

  def year(self) -> int:
    return self.randint(1961, 2018)

  def sentence(self) -> str:
    return f"{self.person()} {self.verb()} {self.thing()} in {self.place()} in {self.year()}."

  def paragraph(self, sentences: int = 3) -> str:
    return " ".join(self.sentence() for _ in range(sentences))

  def hex_id(self, length: int = 24) -> str:
    return "".join(self.choice("0123456789abcdef") for _ in range(length))

  def pick(self, options: tuple) -> object:
    """The option this row's index cycles to: every option appears once per len(options) rows."""
    return options[self.index % len(options)]


@dataclasses.dataclass(frozen=True)
class Fixture:
  """A dataset's real features and its rows; ``variants`` rows cover every label value and
  template branch."""

  features: Features
  make_row: Callable[[Draw], dict]
  variants: int = 2


def _squad_answer(context: str, answer: str) -> dict:
  return {"text": [answer], "answer_start": [context.index(answer)]}


# ------------------------------------------------------------------------------ training datasets


def _mrpc(r):
  who, did, what, where = r.person(), r.verb(), r.thing(), r.place()
  label = r.index % 2
  other = f"{r.person()} said {r.thing()} was missing from a shop in {where}."
  return dict(sentence1=f"{who} {did} {what} in {where} last week, officials said.",
              sentence2=f"Officials said {what} was {did} by {who} in {where} last week."
              if label else other, label=label, idx=r.index)


def _qqp(r):
  thing, label = r.thing(), r.index % 2
  return dict(question1=f"How can I clean {thing} without damaging it?",
              question2=f"What is the safest way to clean {thing}?" if label
              else f"Where can I buy {r.thing()} in {r.place()}?", label=label, idx=r.index)


def _paws(r):
  who, born, moved, year, label = r.person(), r.place(), r.place(), r.year(), r.index % 2
  return dict(id=r.index + 1, sentence1=f"{who} was born in {born} and moved to {moved} in {year}.",
              sentence2=f"Born in {born}, {who} moved to {moved} in {year}." if label
              else f"{who} was born in {moved} and moved to {born} in {year}.", label=label)


def _kilt_provenance(r, title: str) -> dict:
  meta = dict(fever_page_id="", fever_sentence_id=-1, annotation_id="-1", yes_no_answer="",
              evidence_span=[])
  return dict(bleu_score=1.0, start_character=0, start_paragraph_id=1,
              end_character=r.randint(60, 200), end_paragraph_id=1, meta=meta,
              section="Section::::Abstract.", title=title,
              wikipedia_id=str(r.randint(10_000, 60_000_000)))


def _kilt_hotpotqa(r):
  who, where, what = r.person(), r.place(), r.thing()
  meta = dict(left_context="", mention="", right_context="", partial_evidence=[], obj_surface=[],
              sub_surface=[], subj_aliases=[], template_questions=[])
  output = [dict(answer=where, meta=dict(score=-1),
                 provenance=[_kilt_provenance(r, who), _kilt_provenance(r, where)])]
  return dict(id=r.hex_id(), input=f"In which city did {who}, the owner of {what}, settle after"
              f" {r.year()}?", meta=meta, output=output)


def _wiki_qa(r):
  who, label = r.person(), r.index % 2
  answer = (f"{who} became famous after they {r.verb()} {r.thing()} in {r.place()}." if label
            else f"{r.place()} is a port city with a long maritime history.")
  return dict(question_id=f"Q{1000 + r.index}", question=f"how did {who.lower()} become famous",
              document_title=who, answer=answer, label=label)


def _adversarial_qa(model: str):
  def row(r):
    who, did, what, where = r.person(), r.verb(), r.thing(), r.place()
    context = f"{r.sentence()} Later, {who} {did} {what} in {where}. {r.sentence()}"
    return dict(id=r.hex_id(40), title=where, context=context,
                question=f"Who {did} {what} in {where}?",
                answers=_squad_answer(context, who),
                metadata=dict(split=r.split, model_in_the_loop=model))

  return row


def _duorc(r):
  hero, villain = r.sample(PEOPLE, 2)
  title = f"The {r.choice(('Long', 'Last', 'Silent'))} Road"
  plot = (f"{hero} is a courier in {r.place()}. After {villain} steals {r.thing()}, {hero}"
          f" follows the thief to {r.place()} and confronts {villain} on a night train.")
  no_answer = r.index % 2 == 1
  question = ("What does the courier eat for breakfast?" if no_answer
              else "Who steals from the courier?")
  return dict(plot_id=f"/m/0{r.hex_id(5)}", plot=plot, title=title, question_id=r.hex_id(32),
              question=question, answers=[] if no_answer else [villain], no_answer=no_answer)


def _ropes(r):
  low, high = r.sample(("Dune", "Ridge", "Hollow", "Meadow"), 2)
  background = ("Plants need sunlight for photosynthesis. A plant that gets more sunlight makes"
                " more sugar and grows faster than a plant kept in the shade.")
  situation = (f"{r.person()} planted beans in two fields. Field {low} is shaded by tall trees,"
               f" while field {high} gets full sun all day.")
  faster = r.index % 2
  question = f"Which field will grow beans {'faster' if faster else 'more slowly'}?"
  return dict(id=r.hex_id(32), background=background, situation=situation, question=question,
              answers={"text": [f"field {high}" if faster else f"field {low}"]})


def _quoref(r):
  (hero, rival), where = r.sample(PEOPLE, 2), r.place()
  context = (f"{hero} grew up in {where}, where {hero.split()[0]} met {rival} at a music school."
             f" Years later the rival {r.verb()} {r.thing()} that had belonged to the"
             f" school's founder.")
  answer = rival.split()[0]
  return dict(id=r.hex_id(40), question="What is the first name of the person who met the"
              " rival at a music school?", context=context, title=f"{hero} (musician)",
              url=f"https://en.wikipedia.org/wiki/{hero.replace(' ', '_')}",
              answers={"answer_start": [context.index(answer)], "text": [answer]})


def _cos_e(r):
  choices = r.sample(("drawer", "garage", "museum", "attic", "backpack", "shelf", "car"), 5)
  answer = r.pick(choices)
  return dict(id=r.hex_id(32), question=f"Where would you keep {r.thing()} you rarely use?",
              choices=choices, answer=answer,
              abstractive_explanation=f"a {answer} is a place where rarely used things are stored",
              extractive_explanation="rarely use")


def _cosmos_qa(r):
  answers = [f"Because I wanted to {x}." for x in r.sample(
      ("surprise my sister", "save some money", "learn a new skill", "help a neighbor",
       "fix it before winter"), 3)] + ["None of the above choices ."]
  r.shuffle(answers)
  return dict(id=r.hex_id(30), context=f"Yesterday I {r.verb()} {r.thing()} at a flea market in"
              f" {r.place()}. It took the whole afternoon, but I finally got it home.",
              question="Why might I have gone to the flea market?", answer0=answers[0],
              answer1=answers[1], answer2=answers[2], answer3=answers[3], label=r.index % 4)


def _dream(r):
  thing, (place, *elsewhere) = r.thing(), r.sample(PLACES, 3)
  choice = [f"In {p}." for p in elsewhere]
  choice.insert(r.index % 3, f"In {place}.")
  return dict(id=r.index, dialogue_id=f"{r.randint(1, 60)}-{r.randint(1, 900)}",
              dialogue=[f"M: Have you seen {thing}? I left it here this morning.",
                        f"W: Your brother took it with him to {place}.",
                        "M: Then I will call him tonight."],
              question="Where is the man's brother?", choice=choice, answer=f"In {place}.")


def _qasc(r):
  labels = list("ABCDEFGH")
  texts = ["sunlight", "water", "rocks", "wind", "salt", "sound", "metal", "sand"]
  r.shuffle(texts)
  key = r.pick(labels)
  question = f"What do plants need to make {r.choice(('food', 'sugar', 'energy'))}?"
  return dict(id=r.hex_id(30).upper(), question=question,
              choices={"text": texts, "label": labels}, answerKey=key,
              fact1="plants need light to perform photosynthesis.",
              fact2=f"{texts[labels.index(key)].capitalize()} is needed by plants to grow.",
              combinedfact=f"plants need {texts[labels.index(key)]} to make food.",
              formatted_question=question + " " + " ".join(
                  f"({label}) {text}" for label, text in zip(labels, texts)))


def _quail(r):
  answers = [f"{who} {r.verb()} it" for who in r.sample(PEOPLE, 3)] + ["not enough information"]
  author = r.person()
  return dict(id=f"f{r.index:03d}_0", context_id=f"f{r.index:03d}", question_id="0",
              domain=r.choice(("fiction", "news", "blogs", "user_stories")),
              metadata=dict(author=author, title=f"A Winter in {r.place()}",
                            url=f"https://example.org/stories/{r.hex_id(8)}"),
              context=r.paragraph(4), question=f"What happened to {r.thing()}?",
              question_type=r.choice(("Causality", "Factual", "Temporal order", "Unanswerable")),
              answers=answers, correct_answer_id=r.index % 4)


def _quarel(r):
  rough, smooth = r.choice((("carpet", "floor"), ("gravel", "asphalt"), ("grass", "ice")))
  answer_index = r.index % 2
  worlds = (smooth, rough) if answer_index == 0 else (rough, smooth)
  return dict(id=f"QuaRel_V1_Fr_{r.index:04d}", answer_index=answer_index,
              logical_forms=["(infer (speed higher world1) (smoothness higher world2))",
                             "(infer (speed higher world2) (smoothness higher world1))"],
              logical_form_pretty="qrel(speed, higher, world1) -> qrel(smoothness, higher, world2)",
              world_literals={"world1": [worlds[0]], "world2": [worlds[1]]},
              question=f"{r.first_name()} rolled a ball across the {rough} and then across the"
              f" {smooth}. It went farther on the {smooth} because it is smoother."
              f" Where was there less friction? (A) {worlds[0]} (B) {worlds[1]}")


def _quartz(r):
  key, blank = r.index % 2, (r.index // 2) % 2 == 1
  options = ["more", "less"] if key == 0 else ["less", "more"]
  question = ("If Mona heats the water, the sugar will dissolve _____ quickly." if blank
              else "Mona heats the water. Will the sugar dissolve more or less quickly?")
  question_anno = dict.fromkeys(("more_effect_dir", "less_effect_dir", "less_cause_prop",
                                 "more_effect_prop", "less_effect_prop", "less_cause_dir"), "")
  return dict(id=f"QRQA-{r.randint(10000, 99999)}-{r.index}", question=question,
              choices={"text": options, "label": ["A", "B"]}, answerKey="AB"[key],
              para="Sugar dissolves faster in warmer water.",
              para_id=f"QRSent-{r.randint(10000, 99999)}-0",
              para_anno=dict(effect_prop="dissolving speed", cause_dir_str="warmer",
                             effect_dir_str="faster", cause_dir_sign="MORE", effect_dir_sign="MORE",
                             cause_prop="temperature"),
              question_anno=question_anno)


def _sciq(r):
  answer, *distractors = r.sample(("mitochondria", "ribosome", "nucleus", "chloroplast",
                                   "vacuole"), 4)
  return dict(question="Which organelle is known as the powerhouse of the cell?",
              distractor3=distractors[2], distractor1=distractors[0], distractor2=distractors[1],
              correct_answer=answer,
              support=f"The {answer} produces most of the chemical energy a cell needs.")


def _social_i_qa(r):
  who, friend = (name.split()[0] for name in r.sample(PEOPLE, 2))
  return dict(context=f"{who} {r.verb()} {r.thing()} for {friend} before the party.",
              question=f"What will {friend} want to do next?", answerA="thank them",
              answerB="leave the party early", answerC="ignore the gift",
              label=str(r.index % 3 + 1))


def _wiki_hop(r):
  subject = f"{r.choice(('the', 'a'))} {r.choice(('river', 'harbor', 'railway'))} museum"
  candidates = [p.lower() for p in r.sample(PLACES, 5)]
  answer = r.choice(candidates)
  supports = [f"The {subject} is a museum in {answer.title()}.", r.paragraph(2)]
  return dict(id=f"WH_train_{r.index}", question=f"located_in_the_administrative_territorial_entity"
              f" {subject}", answer=answer, candidates=candidates, supports=supports,
              annotations=[])


def _wiqa(r):
  label = r.index % 3
  question_type = ("OUTOFPARA_DISTRACTOR" if label == 2
                   else ("EXOGENOUS_EFFECT", "INPARA_EFFECT")[(r.index // 3) % 2])
  steps = ["Water evaporates from the ocean", "The vapor rises and cools", "Clouds form",
           "Rain falls on the land"] + ([""] if r.index % 2 else [])
  cause = r.choice(("the ocean is warmer", "more clouds form over the sea", "the wind is stronger"))
  return dict(question_stem=f"suppose {cause} happens, how will it affect MORE rain falling?",
              question_para_step=steps, answer_label=("more", "less", "no_effect")[label],
              answer_label_as_choice="ABC"[label],
              choices={"text": ["more", "less", "no effect"], "label": ["A", "B", "C"]},
              metadata_question_id=f"influence_graph:{r.randint(100, 2000)}:{r.index}",
              metadata_graph_id=str(r.randint(100, 2000)), metadata_para_id=str(r.randint(1, 1500)),
              metadata_question_type=question_type, metadata_path_len=r.randint(0, 3))


POSITIVE = ("a delight from start to finish", "warm, funny and beautifully acted",
            "worth every minute", "the best thing I have seen this year")
NEGATIVE = ("a tedious mess", "badly written and worse acted", "a waste of two hours",
            "dull, loud and far too long")


def _opinion(r, label: int) -> str:
  return r.choice(POSITIVE if label else NEGATIVE)


def _amazon_polarity(r):
  label, thing = r.index % 2, r.thing()
  return dict(label=label, title=f"{'Great' if label else 'Disappointing'} {thing.split()[-1]}",
              content=f"I bought {thing} as a gift. Honestly it was {_opinion(r, label)}.")


def _app_reviews(r):
  star = r.index % 5 + 1
  review = ("Crashes every time I open it" if star < 3
            else "Works fine most of the time" if star == 3 else "Great app, does what it says")
  return dict(package_name=f"com.{r.choice(('notes', 'weather', 'maps'))}.{r.hex_id(6)}",
              review=review, date=f"{r.choice(('March', 'July', 'October'))} {r.randint(1, 28)}"
              f" {r.randint(2012, 2017)}", star=star)


def _imdb(r):
  label = r.index % 2
  return dict(text=f"I saw this film in {r.place()}.<br /><br />It is {_opinion(r, label)}."
              f" {r.person()} plays the lead.", label=label)


def _rotten_tomatoes(r):
  label = r.index % 2
  return dict(text=f"{r.person().lower()}'s new film is {_opinion(r, label)} .", label=label)


def _yelp_review_full(r):
  label = r.index % 5
  mood = ("Terrible", "Poor", "Average", "Good", "Outstanding")[label]
  return dict(label=label, text=f"{mood} service at this place in {r.place()}. We ordered the"
              f" soup and {r.choice(('bread', 'salad', 'pie'))}.")


def _common_gen(r):
  dog, ball, park = r.choice((("dog", "ball", "park"), ("child", "kite", "beach"),
                              ("farmer", "tractor", "field")))
  return dict(concept_set_idx=r.index, concepts=[dog, ball, park],
              target=f"A {dog} chases a {ball} across the {park}.")


def _wiki_bio(r):
  name, place, year = r.person().lower(), r.place().lower(), r.year()
  headers = ["name", "birth_date", "birth_place", "occupation", "article_title"]
  contents = [name, f"{r.randint(1, 28)} may {year}", place, "painter", name]
  return dict(input_text={"table": {"column_header": headers,
                                    "row_number": [1] * len(headers), "content": contents},
                          "context": name + "\n"},
              target_text=f"{name} -lrb- born {year} -rrb- is a painter from {place} .\n")


def _cnn_dailymail(r):
  sentences = [r.sentence() for _ in range(4)]
  return dict(article=f"({r.place().upper()}) -- " + " ".join(sentences),
              highlights="\n".join(sentences[:2]), id=r.hex_id(40))


def _gigaword(r):
  who, where = r.person().lower(), r.place().lower()
  return dict(document=f"{who} said on tuesday that the city of {where} will spend ## million"
              " dollars on new tram lines .", summary=f"{where} to spend ## million on trams")


def _multi_news(r):
  articles = [r.paragraph(2) for _ in range(r.randint(2, 3))]
  return dict(document=" ||||| ".join(articles),
              summary=f"– {r.sentence()} {r.sentence()}")


def _samsum(r):
  a, b = (name.split()[0] for name in r.sample(PEOPLE, 2))
  return dict(id=str(13_700_000 + r.index), dialogue=f"{a}: did you bring {r.thing()}?\r\n{b}:"
              f" yes, it is in the car\r\n{a}: great, thanks", summary=f"{b} brought it for {a}.")


def _xsum(r):
  return dict(document="\n".join(r.sentence() for _ in range(3)), summary=r.sentence(),
              id=str(30_000_000 + r.index))


AG_NEWS_TEXTS = ("Leaders meet in {place} to discuss the border dispute.",
                 "{person} scores twice as {place} wins the cup final.",
                 "Shares rise after a bank in {place} reports record profits.",
                 "Researchers in {place} unveil a cheaper solar cell.")


def _ag_news(r):
  label = r.index % 4
  return dict(text=AG_NEWS_TEXTS[label].format(place=r.place(), person=r.person()), label=label)


DBPEDIA_CLASSES = ("Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                   "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                   "Album", "Film", "WrittenWork")
DBPEDIA_DESCRIPTIONS = ("a shipping company", "a public university", "a jazz singer",
                        "a long-distance runner", "a former mayor", "a steam locomotive",
                        "a baroque church", "a glacial lake", "a village", "a species of beetle",
                        "a species of fern", "a studio album", "a 1970s drama film", "a novel")


def _dbpedia_14(r):
  label, place = r.index % 14, r.place()
  title = f"{place} {DBPEDIA_CLASSES[label]} {r.randint(1, 99)}"
  return dict(label=label, title=title,
              content=f" {title} is {DBPEDIA_DESCRIPTIONS[label]} near {place}.")


TREC_COARSE = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
TREC_FINE = (
    "ABBR:abb", "ABBR:exp", "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat",
    "ENTY:currency", "ENTY:dismed", "ENTY:event", "ENTY:food", "ENTY:instru", "ENTY:lang",
    "ENTY:letter", "ENTY:other", "ENTY:plant", "ENTY:product", "ENTY:religion", "ENTY:sport",
    "ENTY:substance", "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq", "ENTY:veh", "ENTY:word",
    "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason", "HUM:gr", "HUM:ind", "HUM:title",
    "HUM:desc", "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state", "NUM:code",
    "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord", "NUM:other", "NUM:period",
    "NUM:perc", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight")
TREC_QUESTIONS = {"ABBR": "What does the abbreviation on {thing} stand for ?",
                  "ENTY": "What {fine} is shown on {thing} ?",
                  "DESC": "Why is {thing} kept in {place} ?",
                  "HUM": "Who {verb} {thing} in {place} ?",
                  "LOC": "Where in {place} was {thing} {verb} ?",
                  "NUM": "How much {fine} does {thing} have ?"}


def _trec(r):
  fine = r.index % len(TREC_FINE)
  coarse, fine_name = TREC_FINE[fine].split(":")
  text = TREC_QUESTIONS[coarse].format(thing=r.thing(), place=r.place(), verb=r.verb(),
                                       fine=fine_name)
  return dict(text=text, coarse_label=TREC_COARSE.index(coarse), fine_label=fine)


# ----------------------------------------------------------------------------- held-out datasets


def _rte(r):
  who, what, where, label = r.person(), r.thing(), r.place(), r.index % 2
  hypothesis = f"{who} lives in {where}." if label == 0 else f"{who} has never been to {where}."
  return dict(premise=f"{who}, who has lived in {where} since {r.year()}, {r.verb()} {what} there.",
              hypothesis=hypothesis, idx=r.index, label=label)


def _cb(r):
  who, where, label = r.person(), r.place(), r.index % 3
  hypothesis = (f"{who} went to {where}", f"{who} stayed at home",
                f"{who} enjoyed the trip to {where}")[label]
  return dict(premise=f"A: Did {who} go to {where} after all? B: Yes, I think {who} went to"
              f" {where} on Sunday, but I do not know whether {who} liked it.",
              hypothesis=hypothesis, idx=r.index, label=label)


COPA_ITEMS = (  # (cause, effect, an alternative that is neither)
    ("The pond froze over.", "The children went skating on it.", "The fish swam to the shore."),
    ("It started to rain.", "The woman opened her umbrella.", "The woman took off her shoes."),
    ("The man's hands were cold.", "He put on his gloves.", "He washed the dishes."),
    ("The power went out.", "The room went dark.", "The radio played louder."))


def _copa(r):
  cause, effect, other = r.choice(COPA_ITEMS)
  label, question = r.index % 2, ("effect", "cause")[(r.index // 2) % 2]
  premise, answer = (cause, effect) if question == "effect" else (effect, cause)
  choices = [other, answer] if label else [answer, other]
  return dict(premise=premise, choice1=choices[0], choice2=choices[1], question=question,
              idx=r.index, label=label)


WIC_WORDS = (("bank", "She sat on the bank of the river.", "He deposited the check at the bank.",
              "The bank raised its interest rates."),
             ("light", "Turn off the light before you leave.", "The box was light enough to carry.",
              "A soft light filled the room."),
             ("run", "I run every morning before work.", "They run a small bakery downtown.",
              "The dogs run across the field."))


def _wic(r):
  word, sentence1, other_sense, same_sense = r.choice(WIC_WORDS)
  label = r.index % 2
  sentence2 = same_sense if label else other_sense
  start1, start2 = sentence1.index(word), sentence2.index(word)
  return dict(word=word, sentence1=sentence1, sentence2=sentence2, start1=start1, start2=start2,
              end1=start1 + len(word), end2=start2 + len(word), idx=r.index, label=label)


def _wsc(r):
  label, plural = r.index % 2, (r.index // 2) % 2 == 1
  thanker, helper = r.sample(PEOPLE, 2)
  pronoun = "they" if plural else "she"
  if plural:
    thanker, helper = "The volunteers", "the organizers"
  text = f"{thanker} thanked {helper} because {pronoun} had carried all the boxes."
  span1 = helper if label else thanker  # the pronoun refers to the helper
  words = text.split(" ")
  return dict(text=text, span1_index=words.index(span1.split(" ")[0]),
              span2_index=words.index(pronoun), span1_text=span1, span2_text=pronoun,
              idx=r.index, label=label)


def _winogrande(r):
  first, second = (name.split()[0] for name in r.sample(PEOPLE, 2))
  answer = r.index % 2 + 1
  trait = "patient" if answer == 1 else "impatient"
  return dict(sentence=f"{first} waited calmly while {second} kept checking the clock, because _"
              f" was {trait}.", option1=first, option2=second,
              answer=str(answer))


HELLASWAG_SCENES = (  # (activity, ctx_a, ctx_b, the ending, three wrong ones)
    ("Washing a car", "A man sprays soap on a blue car.", "he", "scrubs the hood with a sponge.",
     ("eats the sponge.", "drives the car into a lake.", "paints the windows black.")),
    ("Making a sandwich", "A woman lays two slices of bread on a board.", "she",
     "spreads butter on the bread.",
     ("throws the bread at the camera.", "plants the bread in the garden.",
      "folds the board in half.")))


def _hellaswag(r):
  activity, ctx_a, ctx_b, ending, wrong = r.choice(HELLASWAG_SCENES)
  label, wikihow = r.index % 4, (r.index // 4) % 2 == 1
  endings = r.sample(wrong, 3)
  endings.insert(label, ending)
  if wikihow:  # WikiHow rows put the whole context in ctx_a and leave ctx_b empty
    ctx_a, ctx_b = f"[header] How to {activity.lower()} [title] Get ready. [step] {ctx_a}", ""
  return dict(ind=r.index * 7 + 3, activity_label=activity, ctx_a=ctx_a, ctx_b=ctx_b,
              ctx=f"{ctx_a} {ctx_b}".strip(), endings=endings,
              source_id=f"wikihow~{r.randint(1, 90000)}" if wikihow
              else f"activitynet~v_{r.hex_id(11)}",
              split="val" if r.split == "validation" else r.split,
              split_type="indomain" if r.index % 3 else "zeroshot", label=str(label))


def _story_cloze(r):
  who, what = r.first_name(), r.thing()
  right, wrong = f"{who} hung it in the hallway.", f"{who} threw it in the river."
  answer = r.index % 2 + 1
  return dict(story_id=f"{r.hex_id(8)}-{r.hex_id(4)}-{r.hex_id(4)}-{r.hex_id(4)}-{r.hex_id(12)}",
              input_sentence_1=f"{who} found {what} at a market in {r.place()}.",
              input_sentence_2="It was cheap but beautiful.", input_sentence_3=f"{who} bought it.",
              input_sentence_4="At home, there was an empty spot on the wall.",
              sentence_quiz1=right if answer == 1 else wrong,
              sentence_quiz2=wrong if answer == 1 else right, answer_right_ending=answer)


def _anli(r):
  who, where, year, label = r.person(), r.place(), r.year(), r.index % 3
  hypothesis = (f"{who} worked in {where}.", f"{who} was rich.",
                f"{who} never worked in {where}.")[label]
  return dict(uid=f"{r.hex_id(8)}-{r.hex_id(4)}-{r.hex_id(4)}-{r.hex_id(4)}-{r.hex_id(12)}",
              premise=f"{who} (born {year}) is a {r.choice(('painter', 'chemist', 'sailor'))}"
              f" who worked in {where} for ten years.", hypothesis=hypothesis, label=label,
              reason="The text says where they worked; nothing about money or travel.")


# --------------------------------------------------------------------------------- the fixtures


def _strings(*names: str) -> dict:
  return {name: STR for name in names}


SQUAD_ANSWERS = Sequence({"text": STR, "answer_start": INT32})
ADVERSARIAL_QA = Features({**_strings("id", "title", "context", "question"),
                           "answers": SQUAD_ANSWERS,
                           "metadata": _strings("split", "model_in_the_loop")})
DUORC = Features({**_strings("plot_id", "plot", "title", "question_id", "question"),
                  "answers": Sequence(STR), "no_answer": Value("bool")})
KILT_PROVENANCE = {"bleu_score": Value("float32"), "start_character": INT32,
                   "start_paragraph_id": INT32, "end_character": INT32, "end_paragraph_id": INT32,
                   "meta": {**_strings("fever_page_id"), "fever_sentence_id": INT32,
                            **_strings("annotation_id", "yes_no_answer"),
                            "evidence_span": [STR]},
                   **_strings("section", "title", "wikipedia_id")}
KILT = Features({
    **_strings("id", "input"),
    "meta": {**_strings("left_context", "mention", "right_context"),
             "partial_evidence": [{"start_paragraph_id": INT32, "end_paragraph_id": INT32,
                                   **_strings("title", "section", "wikipedia_id"),
                                   "meta": {"evidence_span": [STR]}}],
             **{name: [STR] for name in ("obj_surface", "sub_surface", "subj_aliases",
                                         "template_questions")}},
    "output": [{"answer": STR, "meta": {"score": INT32}, "provenance": [KILT_PROVENANCE]}]})
SENTIMENT = Features({"text": STR, "label": ClassLabel(names=["neg", "pos"])})
DOCUMENT_SUMMARY = Features(_strings("document", "summary"))
SUPER_GLUE_NLI = lambda names: Features({**_strings("premise", "hypothesis"), "idx": INT32,
                                         "label": ClassLabel(names=names)})

FIXTURES: dict[tuple[str, str | None], Fixture] = {
    ("glue", "mrpc"): Fixture(Features({
        **_strings("sentence1", "sentence2"),
        "label": ClassLabel(names=["not_equivalent", "equivalent"]), "idx": INT32}), _mrpc),
    ("glue", "qqp"): Fixture(Features({
        **_strings("question1", "question2"),
        "label": ClassLabel(names=["not_duplicate", "duplicate"]), "idx": INT32}), _qqp),
    ("paws", "labeled_final"): Fixture(Features({
        "id": INT32, **_strings("sentence1", "sentence2"),
        "label": ClassLabel(names=["0", "1"])}), _paws),
    ("kilt_tasks", "hotpotqa"): Fixture(KILT, _kilt_hotpotqa, 1),
    ("wiki_qa", None): Fixture(Features({
        **_strings("question_id", "question", "document_title", "answer"),
        "label": ClassLabel(names=["0", "1"])}), _wiki_qa),
    ("adversarial_qa", "dbidaf"): Fixture(ADVERSARIAL_QA, _adversarial_qa("BiDAF"), 1),
    ("adversarial_qa", "dbert"): Fixture(ADVERSARIAL_QA, _adversarial_qa("BERT-Large"), 1),
    ("adversarial_qa", "droberta"): Fixture(ADVERSARIAL_QA, _adversarial_qa("RoBERTa-Large"), 1),
    ("duorc", "SelfRC"): Fixture(DUORC, _duorc),
    ("duorc", "ParaphraseRC"): Fixture(DUORC, _duorc),
    ("ropes", None): Fixture(Features({
        **_strings("id", "background", "situation", "question"),
        "answers": Sequence({"text": STR})}), _ropes),
    ("quoref", None): Fixture(Features({
        **_strings("id", "question", "context", "title", "url"),
        "answers": Sequence({"answer_start": INT32, "text": STR})}), _quoref, 1),
    ("cos_e", "v1.11"): Fixture(Features({
        **_strings("id", "question"), "choices": Sequence(STR),
        **_strings("answer", "abstractive_explanation", "extractive_explanation")}), _cos_e, 5),
    ("cosmos_qa", None): Fixture(Features({
        **_strings("id", "context", "question", "answer0", "answer1", "answer2", "answer3"),
        "label": INT32}), _cosmos_qa, 4),
    ("dream", None): Fixture(Features({
        "id": INT32, "dialogue_id": STR, "dialogue": Sequence(STR), "question": STR,
        "choice": Sequence(STR), "answer": STR}), _dream, 3),
    ("qasc", None): Fixture(Features({
        **_strings("id", "question"), "choices": Sequence({"text": STR, "label": STR}),
        **_strings("answerKey", "fact1", "fact2", "combinedfact", "formatted_question")}),
        _qasc, 8),
    ("quail", None): Fixture(Features({
        **_strings("id", "context_id", "question_id", "domain"),
        "metadata": _strings("author", "title", "url"),
        **_strings("context", "question", "question_type"), "answers": Sequence(STR),
        "correct_answer_id": INT32}), _quail, 4),
    ("quarel", None): Fixture(Features({
        "id": STR, "answer_index": INT32, "logical_forms": Sequence(STR),
        "logical_form_pretty": STR, "world_literals": Sequence({"world1": STR, "world2": STR}),
        "question": STR}), _quarel),
    ("quartz", None): Fixture(Features({
        **_strings("id", "question"), "choices": Sequence({"text": STR, "label": STR}),
        **_strings("answerKey", "para", "para_id"),
        "para_anno": _strings("effect_prop", "cause_dir_str", "effect_dir_str", "cause_dir_sign",
                              "effect_dir_sign", "cause_prop"),
        "question_anno": _strings("more_effect_dir", "less_effect_dir", "less_cause_prop",
                                  "more_effect_prop", "less_effect_prop", "less_cause_dir")}),
        _quartz, 4),
    ("sciq", None): Fixture(Features(_strings(
        "question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")),
        _sciq, 1),
    ("social_i_qa", None): Fixture(Features(_strings(
        "context", "question", "answerA", "answerB", "answerC", "label")), _social_i_qa, 3),
    ("wiki_hop", "original"): Fixture(Features({
        **_strings("id", "question", "answer"), "candidates": Sequence(STR),
        "supports": Sequence(STR), "annotations": Sequence(Sequence(STR))}), _wiki_hop, 1),
    ("wiqa", None): Fixture(Features({
        "question_stem": STR, "question_para_step": Sequence(STR),
        **_strings("answer_label", "answer_label_as_choice"),
        "choices": Sequence({"text": STR, "label": STR}),
        **_strings("metadata_question_id", "metadata_graph_id", "metadata_para_id",
                   "metadata_question_type"), "metadata_path_len": INT32}), _wiqa, 6),
    ("amazon_polarity", None): Fixture(Features({
        "label": ClassLabel(names=["negative", "positive"]), **_strings("title", "content")}),
        _amazon_polarity),
    ("app_reviews", None): Fixture(Features({
        **_strings("package_name", "review", "date"), "star": Value("int8")}), _app_reviews, 5),
    ("imdb", None): Fixture(SENTIMENT, _imdb),
    ("rotten_tomatoes", None): Fixture(SENTIMENT, _rotten_tomatoes),
    ("yelp_review_full", None): Fixture(Features({
        "label": ClassLabel(names=["1 star", "2 star", "3 stars", "4 stars", "5 stars"]),
        "text": STR}), _yelp_review_full, 5),
    ("common_gen", None): Fixture(Features({
        "concept_set_idx": INT32, "concepts": Sequence(STR), "target": STR}), _common_gen, 1),
    ("wiki_bio", None): Fixture(Features({
        "input_text": {"table": Sequence({"column_header": STR, "row_number": Value("int16"),
                                          "content": STR}),
                       "context": STR},
        "target_text": STR}), _wiki_bio, 1),
    ("cnn_dailymail", "3.0.0"): Fixture(Features(_strings("article", "highlights", "id")),
                                        _cnn_dailymail, 1),
    ("gigaword", None): Fixture(DOCUMENT_SUMMARY, _gigaword, 1),
    ("multi_news", None): Fixture(DOCUMENT_SUMMARY, _multi_news, 1),
    ("samsum", None): Fixture(Features(_strings("id", "dialogue", "summary")), _samsum, 1),
    ("xsum", None): Fixture(Features(_strings("document", "summary", "id")), _xsum, 1),
    ("ag_news", None): Fixture(Features({
        "text": STR, "label": ClassLabel(names=["World", "Sports", "Business", "Sci/Tech"])}),
        _ag_news, 4),
    ("dbpedia_14", None): Fixture(Features({
        "label": ClassLabel(names=list(DBPEDIA_CLASSES)), **_strings("title", "content")}),
        _dbpedia_14, 14),
    ("trec", None): Fixture(Features({
        "text": STR, "coarse_label": ClassLabel(names=list(TREC_COARSE)),
        "fine_label": ClassLabel(names=list(TREC_FINE))}), _trec, len(TREC_FINE)),
    ("super_glue", "rte"): Fixture(SUPER_GLUE_NLI(["entailment", "not_entailment"]), _rte),
    ("super_glue", "cb"): Fixture(SUPER_GLUE_NLI(["entailment", "contradiction", "neutral"]),
                                  _cb, 3),
    ("super_glue", "copa"): Fixture(Features({
        **_strings("premise", "choice1", "choice2", "question"), "idx": INT32,
        "label": ClassLabel(names=["choice1", "choice2"])}), _copa, 4),
    ("super_glue", "wic"): Fixture(Features({
        **_strings("word", "sentence1", "sentence2"),
        **{name: INT32 for name in ("start1", "start2", "end1", "end2", "idx")},
        "label": ClassLabel(names=["False", "True"])}), _wic),
    ("super_glue", "wsc.fixed"): Fixture(Features({
        "text": STR, "span1_index": INT32, "span2_index": INT32,
        **_strings("span1_text", "span2_text"), "idx": INT32,
        "label": ClassLabel(names=["False", "True"])}), _wsc, 4),
    ("winogrande", "winogrande_xl"): Fixture(Features(_strings(
        "sentence", "option1", "option2", "answer")), _winogrande),
    ("hellaswag", None): Fixture(Features({
        "ind": INT32, **_strings("activity_label", "ctx_a", "ctx_b", "ctx"),
        "endings": Sequence(STR), **_strings("source_id", "split", "split_type", "label")}),
        _hellaswag, 8),
    ("story_cloze", "2016"): Fixture(Features({
        **_strings("story_id", "input_sentence_1", "input_sentence_2", "input_sentence_3",
                   "input_sentence_4", "sentence_quiz1", "sentence_quiz2"),
        "answer_right_ending": INT32}), _story_cloze),
    ("anli", None): Fixture(Features({
        **_strings("uid", "premise", "hypothesis"),
        "label": ClassLabel(names=["entailment", "neutral", "contradiction"]), "reason": STR}),
        _anli, 3),
}


def rows(dataset: str, subset: str | None, split: str, count: int) -> list[dict]:
  """``count`` rows of a split (at least the dataset's ``variants``), the same on every call."""
  fixture = FIXTURES[(dataset, subset)]
  return [fixture.make_row(Draw(f"{dataset}/{subset}/{split}/{i}", i, split))
          for i in range(max(count, fixture.variants))]


def split_sizes(rows_per_split: int) -> dict[tuple[str, str | None, str], int]:
  """Every split a T0 run reads and how many rows the fixtures give it: ``rows_per_split`` for a
  training or evaluation split (ANLI's dev_rX too), T-Few's k more for a few-shot pool."""
  sizes = {(dataset, subset, "train"): rows_per_split for dataset, subset, _ in t0.TRAIN_DATASETS}
  for name, task in t0.HELDOUT_TASKS.items():
    sizes[(task.dataset, task.subset, task.train_split)] = task.k + rows_per_split
    for anli_eval in ("test", "dev"):
      sizes[(task.dataset, task.subset, t0.heldout(name, anli_eval).eval_split)] = rows_per_split
  return sizes


def build(data_dir: str, rows_per_split: int = 4) -> None:
  """Writes every split a T0 run reads under ``data_dir`` (``sources.local_path`` layout)."""
  for (dataset, subset, split), count in split_sizes(rows_per_split).items():
    table = datasets.Dataset.from_list(rows(dataset, subset, split, count),
                                       features=FIXTURES[(dataset, subset)].features)
    table.save_to_disk(sources.local_path(data_dir, dataset, subset, split))
