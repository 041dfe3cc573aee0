"""Saving: vanilla transformers loads the result, logits identical, writes are atomic."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sparseforge import load_model, prune, read_metadata, save
from sparseforge.errors import ConfigError, ModelError
from sparseforge.export import METADATA_FILE, check_json_path, check_output


def test_save_load_round_trip_identical_logits(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    report = prune(model, tokenizer, method="sparsegpt", pattern="2:4", calibration=ids, progress=False)
    out = save(model, tokenizer, tmp_path / "pruned", metadata={"pruning": report.to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert reloaded.model.layers[1].mlp.down_proj.weight.eq(0).float().mean() == 0.5
    meta = read_metadata(out)
    assert meta["pruning"]["config"]["pattern"] == "2:4"
    assert meta["pruning"]["calibration"]["fingerprint"]
    json.dumps(meta)


def test_interrupted_save_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    model, tokenizer = load_model(tiny_dir)

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)
    with pytest.raises(KeyboardInterrupt):
        save(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_dir, tmp_path):
    model, tokenizer = load_model(tiny_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        save(model, tokenizer, out)
    save(model, tokenizer, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- interrupted saves, stale temporaries, early checks --------------------------------------------------------


class FakeModel:
    """Writes one small file like save_pretrained; ``fail`` raises it inside the save (an interrupt mid-write)."""

    def __init__(self, text="new", fail=None):
        self.text, self.fail = text, fail

    def save_pretrained(self, path):
        (Path(path) / "config.json").write_text(self.text)
        if self.fail is not None:
            raise self.fail


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def make_output(path, text="old"):
    path.mkdir(parents=True)
    (path / "config.json").write_text(text)
    return path


def test_interrupted_overwrite_keeps_the_old_output(tmp_path):
    out = make_output(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        save(FakeModel(fail=KeyboardInterrupt()), None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "old"


def test_interrupt_between_the_renames_puts_the_old_output_back(tmp_path, monkeypatch):
    out = make_output(tmp_path / "out")
    replace, calls = os.replace, []

    def second_fails(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(KeyboardInterrupt):
        save(FakeModel(), None, out, overwrite=True)
    monkeypatch.undo()
    pid = os.getpid()
    assert calls[0][0] == "out" and calls[1][0].startswith(f".out.tmp-{pid}-")  # the writer's PID in the names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "old"


def test_temporaries_carry_the_pid(tmp_path, monkeypatch):
    out = make_output(tmp_path / "out")
    replace, moves = os.replace, []
    monkeypatch.setattr(os, "replace", lambda src, dst: moves.append((Path(src), Path(dst))) or replace(src, dst))
    save(FakeModel(), None, out, overwrite=True)
    pid = os.getpid()
    (old_src, old_dst), (new_src, new_dst) = moves
    assert old_src == out and old_dst.parent.name.startswith(f".out.old-{pid}-") and old_dst.name == "out"
    assert new_src.name.startswith(f".out.tmp-{pid}-") and new_dst == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "new"


SIGKILLED_SAVE = """
import os, sys
from pathlib import Path
from sparseforge.export import save

class Model:
    def save_pretrained(self, path):
        (Path(path) / "config.json").write_text("new")

replace, calls = os.replace, []
def kill_on_second(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os._exit(9)  # like SIGKILL: no cleanup runs
    replace(src, dst)
os.replace = kill_on_second
save(Model(), None, sys.argv[1], overwrite=True)
"""


def test_a_kill_between_the_renames_is_repaired_by_the_next_check(tmp_path, caplog):
    out = make_output(tmp_path / "out")
    subprocess.run([sys.executable, "-c", SIGKILLED_SAVE, str(out)], check=False)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not out.exists() and len(left) == 2 and {n.split("-")[0] for n in left} == {".out.tmp", ".out.old"}
    with caplog.at_level(logging.WARNING, logger="sparseforge.export"):
        check_output(out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "config.json").read_text() == "old"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "restored" in messages and all(name in messages for name in left)


def test_stale_temporaries_of_dead_writers_go_and_live_ones_stay(tmp_path, caplog):
    out = make_output(tmp_path / "out")
    dead = dead_pid()
    stale = [make_output(tmp_path / f".out.tmp-{dead}-abc"), make_output(tmp_path / ".out.tmp-legacy1"),
             make_output(tmp_path / f".out.old-{dead}-xyz" / "out")]  # the output exists: the old copy goes
    live = make_output(tmp_path / f".out.tmp-{os.getppid()}-live")  # a running writer's
    other = make_output(tmp_path / f".other.tmp-{dead}-abc")  # another output's
    with caplog.at_level(logging.WARNING, logger="sparseforge.export"):
        save(FakeModel(), None, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])
    assert (out / "config.json").read_text() == "new"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert all(str(p if p.name != "out" else p.parent) in messages for p in stale)


def test_output_must_not_be_or_touch_the_input_model(tmp_path):
    model = make_output(tmp_path / "models" / "m")
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(ConfigError) as err:
        check_output(tmp_path / "link", overwrite=True, inputs=[str(model)])
    assert str(err.value) == (f"--output {tmp_path / 'link'} is the input model: choose another directory; "
                              "--overwrite would replace your model")
    with pytest.raises(ConfigError, match="contains the input model"):
        check_output(tmp_path / "models", overwrite=True, inputs=[model])
    with pytest.raises(ConfigError, match="inside the input model"):
        check_output(model / "pruned", inputs=[None, model])
    assert check_output(tmp_path / "elsewhere", inputs=[None, "HuggingFaceTB/SmolLM2-135M", model]) == \
        tmp_path / "elsewhere"


def test_output_parent_must_be_a_writable_directory(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"file, not a directory; choose another --output") as err:
        check_output(tmp_path / "file" / "sub" / "out")
    assert str(tmp_path / "file") in str(err.value)
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked)  # root may write anywhere: pretend
    with pytest.raises(ConfigError, match=f"directory {locked} is not writable"):
        check_output(locked / "new" / "out")
    assert not (locked / "new").exists()


def test_json_path_is_checked_early(tmp_path, monkeypatch):
    assert check_json_path(None) is None and check_json_path("-") is None
    assert check_json_path(tmp_path / "r.json") == tmp_path / "r.json"
    with pytest.raises(ConfigError, match="is a directory: give a file path"):
        check_json_path(tmp_path)
    with pytest.raises(ConfigError, match=f"directory {tmp_path / 'no'} does not exist; create it"):
        check_json_path(tmp_path / "no" / "r.json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        check_json_path(tmp_path / "f" / "r.json")
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ConfigError, match="is not writable; choose another path") as err:
        check_json_path(tmp_path / "r.json")
    assert "\n" not in str(err.value)


def test_read_metadata_of_a_gguf_file_and_a_damaged_one(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert read_metadata(tmp_path / "m.gguf") == {}
    with pytest.raises(ModelError, match="not found"):
        read_metadata(tmp_path / "missing")
    (tmp_path / METADATA_FILE).write_text('{"pruning": ')
    with pytest.raises(ModelError, match=f"cannot read {tmp_path / METADATA_FILE} .*: fix the file or delete it") as err:
        read_metadata(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / METADATA_FILE).write_text("[1]")
    with pytest.raises(ModelError, match="not a JSON object"):
        read_metadata(tmp_path)
