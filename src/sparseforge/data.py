"""Text sources -> deterministic splits -> token windows.

Sources: ``wiki`` (the embedded Wikipedia leads: articles sorted by title,
every 10th held out for evaluation, the rest for calibration and training), a
plain-text file (used whole for either purpose), a JSONL file with a text
field, or a ``datasets`` dataset saved with ``save_to_disk`` (split "train"
for calibration, "validation" or else "test" for evaluation).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from .assets import wiki_summaries_json
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
DOC_SEPARATOR = "\n\n"


def wiki_records(split: str) -> list[dict]:
    """{"title", "text", "topic"} of the embedded Wikipedia articles of one split (train: 9 of every 10 by title).

    The one definition of the ``wiki`` split: articles sorted by title, every 10th held out for
    evaluation, articles without a lead dropped. ``topic`` is the article's vital-article topic
    ("Uncategorized" when it has none).
    """
    articles = json.loads(wiki_summaries_json().read_text(encoding="utf-8"))
    ordered = sorted(articles.values(), key=lambda a: a["title"])
    held_out = split == "eval"
    chosen = [{"title": a["title"], "text": a.get("extract", "").strip(), "topic": a.get("topic") or "Uncategorized"}
              for i, a in enumerate(ordered) if (i % 10 == 9) == held_out]
    return [record for record in chosen if record["text"]]


def wiki_articles(split: str) -> list[tuple[str, str]]:
    """(title, lead) of the embedded Wikipedia articles of one split (train: 9 of every 10 by title)."""
    return [(record["title"], record["text"]) for record in wiki_records(split)]


def wiki_documents(split: str) -> list[str]:
    """The embedded Wikipedia leads of one split."""
    return [text for _, text in wiki_articles(split)]


def jsonl_records(path: str | Path):
    """(line number, record) of every non-blank line of a JSONL file; a bad line is a DataError."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number} is not valid JSON ({e.msg}): fix or remove that line") from None


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    docs = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{number} has no '{text_field}' field: pass --text-field NAME")
        docs.append(str(record[text_field]))
    return docs


def dataset_split(loaded, path, split: str):
    """``(dataset, split name or None)``: a DatasetDict's "train" split for training, "validation"
    else "test" for evaluation; a plain Dataset as it is."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return loaded, None
    wanted = ("train",) if split == "train" else ("validation", "test")
    name = next((s for s in wanted if s in loaded), None)
    if name is None:
        raise DataError(f"dataset {path} has no {' or '.join(wanted)} split (it has {', '.join(loaded)})")
    return loaded[name], name


def _dataset_documents(path: Path, split: str, text_field: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a saved dataset; reading it needs `pip install datasets`") from None
    loaded, _ = dataset_split(datasets.load_from_disk(str(path)), path, split)
    if text_field not in loaded.column_names:
        raise DataError(f"dataset {path} has no '{text_field}' column: pass --text-field NAME")
    return [str(t) for t in loaded[text_field]]


def _binary_share(head: bytes) -> float:
    """Share of ``head`` that is NUL/control bytes or undecodable as UTF-8."""
    if not head:
        return 0.0
    text = head.decode("utf-8", errors="replace")
    bad = sum(1 for ch in text if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\t\n\r\f"))
    return bad / max(1, len(text))


def looks_binary(raw: bytes) -> bool:
    """True for data that is probably not text (a model file, an archive...) passed as text by mistake."""
    return _binary_share(raw[:4096]) > 0.1


def load_documents(source: str, split: str = "train", text_field: str = "text") -> list[str]:
    """The documents of a text source for one split."""
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' unknown: choose from {', '.join(SPLITS)}")
    if source == "wiki":
        docs = wiki_documents(split)
    else:
        path = Path(source)
        if not path.exists():
            raise DataError(f"data {source} not found: give 'wiki', a .txt or .jsonl file, or a saved dataset directory")
        if path.is_dir():
            docs = _dataset_documents(path, split, text_field)
        elif path.suffix == ".jsonl":
            docs = _jsonl_documents(path, text_field)
        else:
            raw = path.read_bytes()
            if looks_binary(raw):
                log.warning("%s looks like a binary file, not text (%d%% of its first 4 KiB are control bytes or not "
                            "UTF-8): check --calib/--data", path, round(100 * _binary_share(raw[:4096])))
            # as read_text would: universal newlines
            docs = [raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data {source} ({split}) holds no text: give a non-empty source")
    return docs


#: documents per tokenizer call: one call on megabytes of text costs far more memory than the ids
DOCS_PER_CALL = 256


def tokenize_documents(tokenizer, docs: list[str]) -> torch.Tensor:
    """Token ids of the documents joined by a blank line, as a 1-D LongTensor.

    Equal to tokenising the joined text at once (tested): the text is cut only just
    before a separator, and pre-tokenisers never merge a word with the newlines after
    it. Cutting keeps the tokenizer's working memory small.
    """
    pieces = []
    for start in range(0, len(docs), DOCS_PER_CALL):
        text = DOC_SEPARATOR.join(docs[start : start + DOCS_PER_CALL])
        if start:
            text = DOC_SEPARATOR + text
        ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        pieces.append(torch.tensor(ids, dtype=torch.long))
    return torch.cat(pieces)


def _check_length(tokens: torch.Tensor, seq_len: int, source: str) -> None:
    if seq_len < 2:
        raise ConfigError(f"seq_len {seq_len} is too small: use at least 2 (e.g. 512)")
    if tokens.numel() < seq_len + 1:
        raise DataError(
            f"data {source} has {tokens.numel()} tokens, fewer than one window of {seq_len}: "
            "give more text or a smaller --seq-len"
        )


def calibration_windows(tokens: torch.Tensor, n: int, seq_len: int, seed: int = 0, source: str = "") -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens at seeded random offsets (SparseGPT's protocol)."""
    if n < 1:
        raise ConfigError(f"number of calibration windows {n} must be at least 1")
    _check_length(tokens, seq_len, source)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (n,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None, source: str = "") -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seq_len`` tokens (the first ``max_windows``)."""
    _check_length(tokens, seq_len, source)
    count = tokens.numel() // seq_len
    if max_windows:
        count = min(count, max_windows)
    return tokens[: count * seq_len].reshape(count, seq_len)


def fingerprint(windows: torch.Tensor) -> str:
    """A short content hash of token windows, recorded with every result."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def check_seq_len(seq_len: int, context_length: int) -> None:
    if seq_len > context_length:
        raise ConfigError(f"seq_len {seq_len} exceeds the model's context of {context_length} tokens: lower --seq-len")


def load_windows(tokenizer, source: str, split: str, seq_len: int, *, n: int | None = None, seed: int = 0,
                 text_field: str = "text") -> torch.Tensor:
    """Token windows of a source: random calibration windows if ``n`` for train, else consecutive ones."""
    tokens = tokenize_documents(tokenizer, load_documents(source, split, text_field))
    log.info("%s/%s: %d tokens", source, split, tokens.numel())
    if split == "train":
        return calibration_windows(tokens, n or 32, seq_len, seed, source)
    return eval_windows(tokens, seq_len, n, source)
