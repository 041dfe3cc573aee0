"""Training examples: packed language-modelling windows, or Alpaca-style instructions.

Both become fixed-length rows of ``input_ids``, ``labels`` (-100 where no loss
is taken) and ``attention_mask``. Which rows form which step is a pure
function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would (no data-loader state to save).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..data import eval_windows, jsonl_records, load_documents, tokenize_documents, wiki_articles
from ..errors import DataError

log = logging.getLogger(__name__)

IGNORE = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class TrainExamples:
    """Rows of equal length: ``input_ids``, ``labels``, ``attention_mask`` (n x seq_len each).

    Subclasses for other tasks (sequence classification: one label per row) say
    how many loss terms a batch holds and what else the model's forward takes.
    """

    #: keyword arguments for the model's forward besides the batch (a causal LM keeps no KV cache in training)
    model_kwargs: dict = {"use_cache": False}
    #: what ``loss_units`` counts, for the throughput in logs
    loss_unit: str = "tok"

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, kind: str):
        if input_ids.shape[0] == 0:
            raise DataError("no training examples: give more data or a larger --seq-len")
        self.input_ids, self.labels, self.attention_mask, self.kind = input_ids, labels, attention_mask, kind

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batch(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[rows], "labels": self.labels[rows], "attention_mask": self.attention_mask[rows]}

    @staticmethod
    def loss_units(batch: dict[str, torch.Tensor]) -> int:
        """Loss terms in a batch: next-token targets that are not ignored."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())


def language_modelling(tokenizer, source: str, seq_len: int, text_field: str = "text") -> TrainExamples:
    """The train split of a text source, tokenised once and cut into consecutive windows."""
    tokens = tokenize_documents(tokenizer, load_documents(source, "train", text_field))
    windows = eval_windows(tokens, seq_len, source=source)
    return TrainExamples(windows, windows.clone(), torch.ones_like(windows), "language-modelling")


def is_instruction_file(source: str) -> bool:
    """A .jsonl file whose first record has an "instruction" field."""
    path = Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    return "instruction" in json.loads(line)
                except json.JSONDecodeError:
                    return False
    return False


def read_instructions(path: str | Path) -> list[dict]:
    records = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise DataError(f"{path}:{number} needs 'instruction' and 'output' fields (Alpaca format)")
        records.append(record)
    if not records:
        raise DataError(f"{path} holds no instructions: give a non-empty Alpaca JSONL file")
    if not any(str(r["output"]).strip() for r in records):
        log.warning("every response ('output') in %s is empty: the model would learn to stop at once; check the file", path)
    return records


def instructions(tokenizer, path: str | Path, seq_len: int) -> TrainExamples:
    """Alpaca records as rows: prompt + response + EOS, loss on the response only, right-padded."""
    records = read_instructions(path)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = torch.full((len(records), seq_len), pad, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    mask = torch.zeros_like(ids)
    kept, truncated = 0, 0
    for record in records:
        template = ALPACA_PROMPT_WITH_INPUT if record.get("input") else ALPACA_PROMPT
        prompt = tokenizer(template.format(**{"input": "", **record}), add_special_tokens=False)["input_ids"]
        response = tokenizer(str(record["output"]), add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        if len(prompt) >= seq_len:
            continue  # nothing of the response would fit: no loss to take
        row = (prompt + response)[:seq_len]
        truncated += len(prompt) + len(response) > seq_len
        ids[kept, : len(row)] = torch.tensor(row)
        labels[kept, len(prompt) : len(row)] = torch.tensor(row[len(prompt) :])
        mask[kept, : len(row)] = 1
        kept += 1
    if kept < len(records):
        log.warning("%d of %d instructions dropped: their prompt alone fills --seq-len %d", len(records) - kept, len(records), seq_len)
    if truncated:
        log.info("%d responses truncated to --seq-len %d", truncated, seq_len)
    return TrainExamples(ids[:kept], labels[:kept], mask[:kept], "instructions")


def training_examples(tokenizer, source: str, seq_len: int, text_field: str = "text") -> TrainExamples:
    """Instructions for an Alpaca JSONL file, packed language-modelling windows for any other source."""
    if is_instruction_file(source):
        return instructions(tokenizer, source, seq_len)
    return language_modelling(tokenizer, source, seq_len, text_field)


def write_wiki_instructions(path: str | Path, split: str = "train", limit: int | None = None) -> int:
    """An Alpaca JSONL built from the embedded Wikipedia: "Write the opening of the article on TITLE" -> lead."""
    rows = [{"instruction": f"Write the opening of the Wikipedia article on {title}.", "input": "", "output": text}
            for title, text in wiki_articles(split)][:limit]
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return len(rows)


def batch_rows(n_examples: int, batch_size: int, micro_batch: int, seed: int) -> torch.Tensor:
    """Row indices of global micro-batch ``micro_batch``: a seeded permutation per epoch."""
    positions = torch.arange(micro_batch * batch_size, (micro_batch + 1) * batch_size)
    epochs, offsets = positions // n_examples, positions % n_examples
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        chosen = epochs == epoch
        rows[chosen] = order[offsets[chosen]]
    return rows
