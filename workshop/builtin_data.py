"""The built-in offline data set and its tokenizer.

Laptops, CI and clusters without internet still need real text to fine-tune on. This module makes it
deterministically from a seed, with no downloads:

- SQuAD-shaped records (``id``, ``title``, ``context``, ``question``, ``answers``) whose answer is a
  span of the context, so the QA code path, label masking and EM/F1 run exactly as on SQuAD;
- plain text paragraphs, for the WikiText-style language-modelling path;
- a small byte-level BPE tokenizer trained on that text with ``tokenizers``.

``context_sentences=(lo, hi)`` sets how many sentences each context has. The default gives short
contexts (tiny runs); ``SQUAD_LIKE_SENTENCES`` gives contexts of about SQuAD's length (about 120 words
on average, with a long tail of a few hundred words), for benchmarks on realistic lengths.

    python -c "from workshop.builtin_data import squad_records; print(squad_records(2)[0])"
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"

# SQuAD v1.1 contexts: mean ~120 words, a long tail of a few hundred. A sentence here is ~15 words;
# lo + (hi - lo) * u**3 sentences (u uniform) has mean lo + (hi - lo) / 4 = 8 sentences, ~120 words.
SQUAD_LIKE_SENTENCES = (3, 23)

_PEOPLE = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
           "Kalani", "Lena", "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq"]
_CITIES = ["Lisbon", "Kyoto", "Nairobi", "Bergen", "Quito", "Tallinn", "Hobart", "Lyon", "Cusco",
           "Gdansk", "Porto", "Osaka", "Accra", "Turku", "Leon", "Split", "Perth", "Graz"]
_FIELDS = ["astronomy", "botany", "chemistry", "geology", "linguistics", "mathematics", "music",
           "oceanography", "philosophy", "robotics", "statistics", "zoology"]
_OBJECTS = ["telescope", "violin", "microscope", "compass", "lantern", "typewriter", "bicycle",
            "camera", "globe", "sextant", "harp", "kettle"]
_COLOURS = ["red", "blue", "green", "amber", "violet", "silver", "ochre", "teal", "crimson", "ivory"]
_INSTITUTIONS = ["the Royal Academy", "the City Museum", "the Northern Institute", "the Old Library",
                 "the Harbour School", "the Mountain Observatory", "the River College"]

# (fact sentence, question, answer key). Every answer is a field of the subject that appears verbatim
# in its fact sentence, so the answer is always a span of the context.
_FACTS = [
    ("{name} was born in {city} in {year}.", "In which city was {name} born?", "city"),
    ("{name} was born in {city} in {year}.", "In what year was {name} born?", "year"),
    ("{name} studied {field} at {institution}.", "What did {name} study?", "field"),
    ("{name} studied {field} at {institution}.", "Where did {name} study {field}?", "institution"),
    ("{name} always carried a {colour} {object} on long journeys.", "What did {name} carry on long journeys?", "object"),
    ("{name} always carried a {colour} {object} on long journeys.", "What colour was the {object} of {name}?", "colour"),
    ("In {award_year}, {name} received the {prize} Prize.", "Which prize did {name} receive?", "prize"),
    ("In {award_year}, {name} received the {prize} Prize.", "When did {name} receive the {prize} Prize?", "award_year"),
]
_PRIZES = ["Meridian", "Aurora", "Keystone", "Lumen", "Halcyon", "Vertex", "Solstice"]

# Filler sentences make contexts longer without adding answerable facts, like most of a SQuAD paragraph.
_FILLER = [
    "The {adj} weather in {city} shaped many of the {noun} that people there still remember.",
    "Several {noun} from that period are kept in {institution}, where visitors can see them today.",
    "Historians disagree about how much the {adj} climate of {city} influenced the local {noun}.",
    "Many of the {noun} were written down only later, and some of them are {adj} or incomplete.",
    "Travellers from {city} often described the {adj} streets, the markets and the {noun} of the harbour.",
    "A later study of {field} argued that the {noun} of the region were more {adj} than once thought.",
]
_ADJ = ["quiet", "rainy", "busy", "ancient", "remarkable", "modest", "famous", "difficult", "uncertain"]
_NOUN = ["stories", "letters", "festivals", "buildings", "records", "songs", "maps", "customs"]


def _person(rng: random.Random) -> dict:
    year = rng.randint(1820, 1990)
    return {
        "name": f"{rng.choice(_PEOPLE)} {rng.choice(_PEOPLE)}son",
        "city": rng.choice(_CITIES),
        "year": str(year),
        "field": rng.choice(_FIELDS),
        "institution": rng.choice(_INSTITUTIONS),
        "object": rng.choice(_OBJECTS),
        "colour": rng.choice(_COLOURS),
        "prize": rng.choice(_PRIZES),
        "award_year": str(year + rng.randint(25, 60)),
    }


def _filler(rng: random.Random, person: dict) -> str:
    return rng.choice(_FILLER).format(adj=rng.choice(_ADJ), noun=rng.choice(_NOUN),
                                      city=rng.choice(_CITIES), field=rng.choice(_FIELDS),
                                      institution=rng.choice(_INSTITUTIONS))


def squad_records(n: int, seed: int = 0, context_sentences: tuple[int, int] = (2, 4)) -> list[dict]:
    """``n`` SQuAD-format records; the same ``seed`` always gives the same records."""
    rng = random.Random(seed)
    lo, hi = context_sentences
    records = []
    for i in range(n):
        person = _person(rng)
        fact, question, key = rng.choice(_FACTS)
        fact = fact.format(**person)
        # Skewed towards short contexts, as SQuAD's are (few very long paragraphs).
        n_sentences = lo + round((hi - lo) * rng.random() ** 3)
        sentences = [_filler(rng, person) for _ in range(max(n_sentences - 1, 0))]
        sentences.insert(rng.randint(0, len(sentences)), fact)
        context = " ".join(sentences)
        answer = person[key]
        start = context.index(fact) + fact.index(answer)
        assert context[start:start + len(answer)] == answer
        records.append({
            "id": f"builtin-{seed}-{i}",
            "title": person["name"],
            "context": context,
            "question": question.format(**person),
            "answers": {"text": [answer], "answer_start": [start]},
        })
    return records


def text_lines(n_paragraphs: int, seed: int = 0) -> list[str]:
    """Plain-text paragraphs (one per line), the WikiText-shaped side of the built-in data."""
    records = squad_records(n_paragraphs, seed=seed, context_sentences=(3, 8))
    return [f"{r['title']} . {r['context']}" for r in records]


def build_tokenizer(vocab_size: int = 2048, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the built-in text; deterministic for a given seed."""
    corpus = [f"Question: {r['question']}\nContext: {r['context']}\nAnswer: {r['answers']['text'][0]}"
              for r in squad_records(2000, seed=seed, context_sentences=SQUAD_LIKE_SENTENCES)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=EOS_TOKEN, pad_token=PAD_TOKEN)
