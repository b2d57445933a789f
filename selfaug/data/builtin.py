"""The built-in RAG data set (docs/design.md, "Data"): fictional entities, so that the answer can only
come from the documents.

Each example has `num_documents` short documents, one about the entity asked of and the others about
other entities (distractors, with the same attributes and other values), a question about one
attribute, and the answer in a fixed format. Seeded; the train and eval splits share no entity.
"""
from __future__ import annotations

import random

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "h", "k", "kr", "l", "m", "n", "p", "qu", "r", "s",
           "st", "t", "th", "v", "vr", "z", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ia", "ou", "y"]
_CODAS = ["", "n", "r", "s", "th", "l", "x", "nd", "rk", "m"]

_KINDS = {
    "inventor": [("birth_year", "was {name} born", "{name} was born in {v}."),
                 ("home_city", "did {name} grow up", "{name} grew up in the city of {v}."),
                 ("invention", "did {name} invent", "{name} is best known for inventing the {v}."),
                 ("mentor", "was the mentor of {name}", "{name} trained under the engineer {v}.")],
    "river": [("length_km", "long is the {name} River, in kilometres", "The {name} River is {v} kilometres long."),
              ("source", "is the source of the {name} River", "The {name} River rises in the {v} Mountains."),
              ("fish", "fish is the {name} River known for", "The {name} River is known for its {v} fish."),
              ("discoverer", "first mapped the {name} River", "The {name} River was first mapped by {v}.")],
    "company": [("founded", "was {name} Industries founded", "{name} Industries was founded in {v}."),
                ("headquarters", "is {name} Industries headquartered", "{name} Industries has its headquarters in {v}."),
                ("product", "does {name} Industries make", "{name} Industries makes {v}."),
                ("ceo", "leads {name} Industries", "{name} Industries is led by {v}.")],
}
_QUESTION_WORD = {"birth_year": "In what year", "home_city": "In which city", "invention": "What",
                  "mentor": "Who", "length_km": "How", "source": "What", "fish": "Which",
                  "discoverer": "Who", "founded": "In what year", "headquarters": "Where",
                  "product": "What", "ceo": "Who"}
_INVENTIONS = ["steam loom", "glass compass", "copper lantern", "wind clock", "tidal pump", "paper kite engine",
               "mirror telescope", "brass calculator", "salt battery", "rope elevator"]
_PRODUCTS = ["ceramic valves", "folding bicycles", "weather balloons", "silk cables", "solar kettles",
             "wooden robots", "ice skates", "glass drums"]
POOL_SIZE = 3000
_FISH = ["silver", "spotted", "blue", "striped", "golden", "red-finned", "giant", "ghost"]


def _name(rng: random.Random) -> str:
    syllables = rng.randint(2, 3)
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return s.capitalize()


def _value(attr: str, rng: random.Random) -> str:
    if attr in ("birth_year", "founded"):
        return str(rng.randint(1620, 1990))
    if attr == "length_km":
        return str(rng.randint(40, 3900))
    if attr in ("home_city", "headquarters"):
        return _name(rng) + rng.choice(["ville", "port", "burg", "ford", "ton"])
    if attr == "source":
        return _name(rng)
    if attr in ("mentor", "discoverer", "ceo"):
        return f"{_name(rng)} {_name(rng)}"
    if attr == "invention":
        return rng.choice(_INVENTIONS)
    if attr == "product":
        return rng.choice(_PRODUCTS)
    if attr == "fish":
        return rng.choice(_FISH)
    raise KeyError(attr)


def _entities(count: int, rng: random.Random) -> list[dict]:
    names, out = set(), []
    while len(out) < count:
        name = _name(rng)
        if name in names:
            continue
        names.add(name)
        kind = rng.choice(sorted(_KINDS))
        out.append({"name": name, "kind": kind, "attrs": {a[0]: _value(a[0], rng) for a in _KINDS[kind]}})
    return out


# facts-free sentences that lengthen a document (length-skewed sets): they name the entity, never a value
_FILLER = ["Several old letters mention {name} in passing.", "Local archives keep a thin folder on {name}.",
           "Historians disagree about how much is known of {name}.", "A short article about {name} appeared once.",
           "Few visitors ask about {name} nowadays.", "The records on {name} were copied by hand twice.",
           "Some of the early notes about {name} are hard to read.", "{name} is listed in a regional almanac.",
           "A school textbook devotes a paragraph to {name}.", "Nobody has written a full account of {name} yet."]


def _document(entity: dict, rng: random.Random, extra_sentences: int = 0) -> str:
    facts = [tmpl.format(name=entity["name"], v=entity["attrs"][attr]) for attr, _, tmpl in _KINDS[entity["kind"]]]
    if extra_sentences:  # no draw at all when 0: the fixed-length sets stay what they were
        facts += [rng.choice(_FILLER).format(name=entity["name"]) for _ in range(rng.randint(0, extra_sentences))]
    rng.shuffle(facts)
    return " ".join(facts)


def generate(split: str, size: int, seed: int = 0, num_documents: int = 4, max_documents: int | None = None,
             extra_sentences: int = 0) -> list[dict]:
    """RAG-form records {"question", "documents", "answer", "entity", "distractors"} for `split` in {train,
    eval}; "distractors": the asked attribute's value in each other document (for the strict metric).
    Length-skewed sets: `max_documents` draws each question's document count from [num_documents,
    max_documents]; `extra_sentences` adds 0..N fact-free sentences to each document."""
    return list(iter_records(split, size, seed, num_documents, max_documents, extra_sentences))


def iter_records(split: str, size: int, seed: int = 0, num_documents: int = 4, max_documents: int | None = None,
                 extra_sentences: int = 0):
    """The records of `generate`, one at a time (datasets.Dataset.from_generator writes them to Arrow)."""
    if split not in ("train", "eval"):
        raise ValueError(f"unknown split {split!r}")
    rng = random.Random(seed)
    pool = _entities(POOL_SIZE, rng)  # fixed: the same pool for every split and size
    half = len(pool) // 2
    entities = pool[:half] if split == "train" else pool[half:]  # disjoint entities
    rng = random.Random(f"{seed}-{split}")
    by_kind = {kind: [e for e in entities if e["kind"] == kind] for kind in _KINDS}  # in pool order
    where = {id(e): i for group in by_kind.values() for i, e in enumerate(group)}
    for _ in range(size):
        target = rng.choice(entities)
        group, i = by_kind[target["kind"]], where[id(target)]
        same_kind = group[:i] + group[i + 1:]  # the others of its kind, in pool order
        n_docs = num_documents if max_documents is None else rng.randint(num_documents, max_documents)
        distractors = rng.sample(same_kind, min(n_docs - 1, len(same_kind)))
        docs = [target] + distractors
        rng.shuffle(docs)
        attr, phrase, _ = rng.choice(_KINDS[target["kind"]])
        question = f"{_QUESTION_WORD[attr]} {phrase.format(name=target['name'])}?"
        yield {"question": question, "documents": [_document(d, rng, extra_sentences) for d in docs],
               "answer": target["attrs"][attr], "entity": target["name"],
               "distractors": [d["attrs"][attr] for d in docs if d is not target]}
