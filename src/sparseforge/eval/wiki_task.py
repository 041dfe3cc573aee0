"""The data of ``sparseforge_wiki``, a zero-shot lm-eval task that runs without any download.

Each example is one held-out Wikipedia article (data.py's ``wiki`` eval split: articles
sorted by title, every 10th): its first sentence is the context, and the model picks its
true second sentence among four endings, the other three being the second sentences of
other held-out articles (HellaSwag's format). The distractors come from the same pool as
the true endings, so a model that ignores the context scores 1/4 in expectation.

The examples are a pure function of the embedded text and :data:`SEED`; they are written
once as JSONL to the user's cache (the package directory may be read-only).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
from pathlib import Path

from ..assets import cache_dir, wiki_summaries_json
from ..data import wiki_records

TASK_NAME = "sparseforge_wiki"
#: choices per example: the true ending and CHOICES - 1 distractors
CHOICES = 4
SEED = 1234
#: bumped whenever the examples change, so a cached file of an older build is never read
FORMAT_VERSION = 1
#: sentence lengths (characters) an example may use: no fragments, no run-on paragraphs
MIN_CHARS, MAX_CHARS = 20, 300

# A sentence ends at . ! or ? after a lowercase letter, digit or closing bracket/quote, before
# whitespace and a capital, digit or opening quote/bracket (so initials like "J. R. R." do not end one).
_BOUNDARY = re.compile(r"(?<=[a-z0-9)\]\"'%][.!?])\s+(?=[A-Z0-9\"'(])")
#: words whose period does not end a sentence
_ABBREVIATIONS = frozenset("Mr. Mrs. Ms. Dr. St. Jr. Sr. Mt. vs. No. Co. Inc. Ltd. c. ca. approx. Gen. Prof. Rev. "
                           "Sgt. Col. Lt. Capt. Gov. Sen. Rep. Ft. Fr. etc. e.g. i.e.".split())


def sentences(text: str) -> list[str]:
    """The sentences of a paragraph, by punctuation (no model: the split must be reproducible anywhere)."""
    out: list[str] = []
    for piece in _BOUNDARY.split(text.strip()):
        if out and out[-1].rsplit(None, 1)[-1] in _ABBREVIATIONS:
            out[-1] += " " + piece
        else:
            out.append(piece)
    return out


def _usable(sentence: str) -> bool:
    return MIN_CHARS <= len(sentence) <= MAX_CHARS


def build_examples(records: list[dict], seed: int = SEED, choices: int = CHOICES) -> list[dict]:
    """One example per article whose first two sentences are usable: ``{"title", "context", "endings", "label"}``.

    ``endings[label]`` is the article's second sentence; the others are second sentences of
    other articles, drawn with a seeded generator, as is the true ending's position.
    """
    pairs = []
    for record in records:
        parts = sentences(record["text"])
        if len(parts) >= 2 and _usable(parts[0]) and _usable(parts[1]):
            pairs.append((record["title"], parts[0], parts[1]))
    pool = list(dict.fromkeys(ending for _, _, ending in pairs))  # each distinct second sentence once
    rng = random.Random(seed)
    examples = []
    for title, context, ending in pairs:
        distractors = rng.sample([other for other in pool if other != ending], choices - 1)
        label = rng.randrange(choices)
        endings = distractors[:label] + [ending] + distractors[label:]
        examples.append({"title": title, "context": context, "endings": endings, "label": label})
    return examples


def _source_digest() -> str:
    return hashlib.sha256(wiki_summaries_json().read_bytes()).hexdigest()[:12]


def task_file() -> Path:
    """The task's JSONL in the cache (written once, atomically), for the embedded text's held-out split."""
    target = cache_dir() / "lm-eval" / f"{TASK_NAME}-v{FORMAT_VERSION}-{_source_digest()}.jsonl"
    if target.is_file():
        return target
    lines = [json.dumps(example, ensure_ascii=False, sort_keys=True) for example in build_examples(wiki_records("eval"))]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_examples(path: str | Path) -> list[dict]:
    """The examples of a task file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def lm_eval_dataset(**_metadata):
    """The task's ``custom_dataset`` for lm-eval: ``{"test": Dataset}`` (lm-eval passes its metadata; unused)."""
    import datasets

    return {"test": datasets.Dataset.from_list(read_examples(task_file()))}
