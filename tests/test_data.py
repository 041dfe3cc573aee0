"""Text sources, deterministic splits and windows."""

import json

import pytest
import torch

from sparseforge.data import (
    calibration_windows,
    eval_windows,
    fingerprint,
    load_documents,
    wiki_documents,
)
from sparseforge.errors import DataError


def test_wiki_split_is_deterministic_and_disjoint():
    train, held_out = wiki_documents("train"), wiki_documents("eval")
    assert len(train) > 8 * len(held_out) > 0
    assert not set(train) & set(held_out)
    assert wiki_documents("eval") == held_out


def test_windows_seeded_and_exact():
    tokens = torch.arange(1000)
    a = calibration_windows(tokens, 8, 64, seed=3)
    assert a.shape == (8, 64) and torch.equal(a, calibration_windows(tokens, 8, 64, seed=3))
    assert not torch.equal(a, calibration_windows(tokens, 8, 64, seed=4))
    assert ((a[:, 1:] - a[:, :-1]) == 1).all()  # contiguous slices
    ev = eval_windows(tokens, 100, max_windows=3)
    assert torch.equal(ev.flatten(), torch.arange(300))
    assert eval_windows(tokens, 100).shape == (10, 100)
    assert fingerprint(a) != fingerprint(ev)


def test_jsonl_text_and_errors(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_documents(str(good)) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no 'text' field"):
        load_documents(str(bad))
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{oops\n")
    with pytest.raises(DataError, match="not valid JSON"):
        load_documents(str(broken))


def test_empty_missing_and_short_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(str(empty))
    with pytest.raises(DataError, match="not found"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="fewer than one window"):
        calibration_windows(torch.arange(10), 2, 64)


def test_saved_dataset_directory(tmp_path):
    import datasets
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a b", "c"]}),
         "test": datasets.Dataset.from_dict({"text": ["held out"]})}
    ).save_to_disk(str(tmp_path / "ds"))
    assert load_documents(str(tmp_path / "ds"), "train") == ["a b", "c"]
    assert load_documents(str(tmp_path / "ds"), "eval") == ["held out"]


def test_tokenising_in_pieces_equals_tokenising_at_once(smol_dir):
    from transformers import AutoTokenizer

    from sparseforge.data import DOC_SEPARATOR, DOCS_PER_CALL, tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    docs = wiki_documents("eval")[: 3 * DOCS_PER_CALL + 7]
    whole = tokenizer(DOC_SEPARATOR.join(docs), add_special_tokens=False)["input_ids"]
    assert tokenize_documents(tokenizer, docs).tolist() == whole
