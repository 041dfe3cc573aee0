"""Fault injection on the real command line: every bad input, damaged file and interruption ends in ONE
line ``sparseforge: error: ...`` that names the fix, exit status 2, no traceback, and nothing written.

The catalogue below is the specification; each record is one test id. All runs happen once per session,
concurrently (the ``faults`` fixture), and each test only asserts on its run's recorded outcome:

- ``CASES``: a command line (placeholders ``{NAME}`` are shared, read-only fixtures), the expected kind
  (error / ok / warn / error-or-warn), a hint the message must contain (case-insensitive; a tuple = any
  of them), the private fixtures put into the run's own working directory (``local``), and ``before``:
  "load" = the command names ``{TRIP}``, a model whose weights are garbage, so a refusal that comes
  after the weights load shows up as that model's load error instead of the case's own message.
- ``INTERRUPTS``: a command, a marker to wait for in its output, the signal to send, what must be
  left behind; after SIGKILL a stale hidden sibling may remain, but then a second run writing the same
  output must succeed and leave nothing hidden.

Every run's working directory is snapshotted (names, recursively, hidden ones included) before and
after: nothing may appear but what the case allows, and every pre-existing input keeps its sha256.

The runs are the real CLI (``sparseforge.__main__`` -> ``cli.main``), each in its own process and
session, 4 at a time. A fresh ``python -m sparseforge`` spends ~4 s (far more on a loaded machine)
importing torch and transformers, too much for ~75 runs in the time budget; so by default each run is a
child forked from a server that imported them once (``tests/faults_zygote.py``: the child does what
``python -m`` does, tracebacks and exit statuses included). ``SPARSEFORGE_FAULTS_FRESH=1`` runs every
one as a fresh ``python -m sparseforge`` process instead (slower, same verdicts). ``-k`` runs only the
selected ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ZYGOTE = HERE / "faults_zygote.py"
WORKERS = 4
CASE_TIMEOUT = 120  # seconds per CLI run; reaching it is a failure
FRESH = os.environ.get("SPARSEFORGE_FAULTS_FRESH") == "1"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "SPARSEFORGE_COMPILE": "0"}
ERROR = "sparseforge: error:"

# ------------------------------------------------------------------------------------------------ catalogue

#: small settings everywhere: a case that wrongly runs still finishes in seconds (a flag given again after these
#: overrides them: argparse keeps the last)
CAL = ("--calib", "{SMALL}", "--n-calib", "2", "--seq-len", "32", "--no-eval")
PRUNE = ("prune", "--model", "{TINY}", *CAL)
PRUNE_TRIP = ("prune", "--model", "{TRIP}", *CAL)
TRAINING = ("--data", "{SMALL}", "--steps", "2", "--seq-len", "32", "--batch-size", "1", "--no-eval")
FINETUNE_TRIP = ("finetune", "--model", "{TRIP}", "--method", "spp", *TRAINING)
TRAIN_TRIP = ("train", "--model", "{TRIP}", "--task", "lm", "--method", "losparse", *TRAINING)
CLASSIFY = ("train", "--task", "classify", "--model", "{TINY}", "--method", "dense", "--steps", "2", "--seq-len", "32",
            "--batch-size", "1", "--no-eval")
SCRATCH = ("train", "--task", "lm", "--method", "dense", *TRAINING)
RESUME = ("finetune", "--model", "{TINY}", "--method", "spp", *TRAINING, "--checkpoint-every", "1",
          "--checkpoint-dir", "ck", "--resume")
#: the command that builds the checkpoint the RESUME cases damage (same settings: resuming it is allowed)
MAKE_CHECKPOINT = ("finetune", "--model", "{TINY}", "--method", "spp", *TRAINING, "--checkpoint-every", "1",
                   "--checkpoint-dir", "{FIX}/ck-src")
ONE_CLASS_HINT = ("one class", "single class", "1 class", "two classes", "2 classes", "one label", "single label",
                  "two labels", "2 labels", "two distinct", "2 distinct")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    hint: str | tuple[str, ...] = ()
    kind: str = "error"  # error: exit 2 + one line | ok: exit 0 | warn: exit 0 + a warning | error-or-warn
    before: str | None = None  # "load": refused before the weights load (argv names {TRIP})
    local: tuple[str, ...] = ()  # private fixtures built in the run's working directory (LOCAL)
    new: tuple[str, ...] = ()  # names the run may create in its working directory
    group: str = "cli.py validation"  # the component that must change if it fails (for the report)
    check: str | None = None  # an extra check (CHECKS)
    max_len: int | None = None  # longest acceptable error line


CASES = [
    # --- A. numbers: refused before the model loads --------------------------------------------------------
    Case("A-sparsity-1.5", (*PRUNE_TRIP, "--sparsity", "1.5"), "--sparsity", before="load"),
    Case("A-sparsity-negative", (*PRUNE_TRIP, "--sparsity", "-0.1"), "--sparsity", before="load"),
    Case("A-sparsity-nan", (*PRUNE_TRIP, "--sparsity", "nan"), "--sparsity", before="load"),
    Case("A-sparsity-abc", (*PRUNE_TRIP, "--sparsity", "abc"), "--sparsity", before="load"),
    Case("A-pattern-3:2", (*PRUNE_TRIP, "--pattern", "3:2"), "3:2", before="load"),
    Case("A-pattern-2:0", (*PRUNE_TRIP, "--pattern", "2:0"), "2:0", before="load"),
    Case("A-pattern-2-4", (*PRUNE_TRIP, "--pattern", "2-4"), "2-4", before="load"),
    Case("A-n-calib-0", (*PRUNE_TRIP, "--n-calib", "0"), "--n-calib", before="load"),
    Case("A-n-calib-negative", (*PRUNE_TRIP, "--n-calib", "-3"), "--n-calib", before="load"),
    Case("A-seq-len-0", (*PRUNE_TRIP, "--seq-len", "0"), "--seq-len", before="load"),
    Case("A-dampening-inf", (*PRUNE_TRIP, "--dampening", "inf"), "--dampening", before="load"),
    Case("A-dampening-negative", (*PRUNE_TRIP, "--dampening", "-1"), "--dampening", before="load"),
    Case("A-dampening-nan", (*PRUNE_TRIP, "--dampening", "nan"), "--dampening", before="load"),
    Case("A-block-fraction-0", (*PRUNE_TRIP, "--block-fraction", "0"), "--block-fraction", before="load"),
    Case("A-block-fraction-1.5", (*PRUNE_TRIP, "--block-fraction", "1.5"), "--block-fraction", before="load"),
    Case("A-iterations-negative", (*PRUNE_TRIP, "--method", "sparsellm", "--iterations", "-1"), "--iterations",
         before="load"),
    Case("A-finetune-steps-0", (*FINETUNE_TRIP, "--steps", "0"), "--steps", before="load"),
    Case("A-finetune-lr-nan", (*FINETUNE_TRIP, "--lr", "nan"), "--lr", before="load"),
    Case("A-finetune-lr-negative", (*FINETUNE_TRIP, "--lr", "-1"), "--lr", before="load"),
    Case("A-finetune-warmup-2", (*FINETUNE_TRIP, "--warmup", "2"), "--warmup", before="load"),
    Case("A-train-keep-0", (*TRAIN_TRIP, "--keep", "0"), "--keep", before="load"),
    Case("A-train-keep-1.5", (*TRAIN_TRIP, "--keep", "1.5"), "--keep", before="load"),
    Case("A-transpa-target-params-1", (*TRAIN_TRIP, "--method", "transpa", "--target-params", "1.0"), "--target-params",
         before="load"),
    Case("A-transpa-theta-0", (*TRAIN_TRIP, "--method", "transpa", "--theta", "0"), "--theta", before="load"),
    Case("A-transpa-fraction-1.2", (*TRAIN_TRIP, "--method", "transpa", "--fraction", "1.2"), "--fraction",
         before="load"),
    Case("A-bench-repeats-0", ("bench-speed", "--model", "{TRIP}", "--repeats", "0", "--prefill-tokens", "8",
                               "--decode-tokens", "2", "--context", "8"), "--repeats", before="load"),
    Case("A-eval-windows-negative", ("eval", "--model", "{TRIP}", "--data", "{SMALL}", "--seq-len", "32",
                                     "--eval-windows", "-1"), "--eval-windows", before="load"),
    # --- B. patterns against the layers, read from the config before the weights load --------------------
    Case("B-pattern-M-divides-no-width", (*PRUNE_TRIP, "--pattern", "3:24"), ("64", "128"), before="load"),
    Case("B-override-glob-matches-nothing", (*PRUNE_TRIP, "--override", "nomatch.*=0.5"), "nomatch.*", before="load"),
    Case("B-skip-every-layer", (*PRUNE_TRIP, "--skip", "*"), "skip", before="load"),
    Case("B-override-bad-value", (*PRUNE_TRIP, "--override", "*.q_proj=2:x"), "2:x", before="load"),
    # --- C. paths --------------------------------------------------------------------------------------------
    Case("C-json-parent-missing", (*PRUNE_TRIP, "--json", "/nonexistent/dir/out.json"), "--json", before="load"),
    Case("C-json-is-a-directory", (*PRUNE_TRIP, "--json", "report"), "--json", before="load", local=("report_dir",)),
    Case("C-output-parent-is-a-file", (*PRUNE_TRIP, "--output", "afile/out"), "afile", before="load",
         local=("afile",)),
    Case("C-output-is-model-overwrite", ("prune", "--model", "model", *CAL, "--output", "model", "--overwrite"),
         ("--model", "input"), before="work", local=("model_copy",)),
    Case("C-output-is-model-other-spelling", ("prune", "--model", "model", *CAL, "--output", "./model/",
                                              "--overwrite"), ("--model", "input"), before="work",
         local=("model_copy",)),
    Case("C-output-not-empty", (*PRUNE_TRIP, "--output", "out"), "--overwrite", before="load", local=("old_output",)),
    Case("C-model-missing", ("prune", "--model", "./no-such-model", *CAL), "no-such-model", group="loading+export"),
    Case("C-model-empty-dir", ("prune", "--model", "empty-model", *CAL), "config.json", local=("empty_model_dir",),
         group="loading+export"),
    Case("C-calib-missing", (*PRUNE, "--calib", "no-such-calib.txt"), "no-such-calib.txt", group="data"),
    Case("C-calib-empty", (*PRUNE, "--calib", "{EMPTY_TXT}"), "empty.txt", group="data"),
    Case("C-eval-data-whitespace", ("eval", "--model", "{TINY}", "--data", "{WHITESPACE_TXT}", "--seq-len", "32",
                                    "--eval-windows", "1"), "whitespace.txt", group="data"),
    Case("C-info-missing-dir", ("info", "no-such-dir"), "no-such-dir", group="loading+export"),
    Case("C-eval-model-missing", ("eval", "--model", "./no-such-model", "--data", "{SMALL}", "--seq-len", "32"),
         "no-such-model", group="loading+export"),
    Case("C-finetune-data-missing", ("finetune", "--model", "{TINY}", "--method", "spp", *TRAINING, "--data",
                                     "missing.jsonl"), "missing.jsonl", group="data"),
    Case("C-classify-label-field-absent", (*CLASSIFY, "--data", "{LABELLED}", "--label-field", "topic_missing"),
         "topic_missing", group="data"),
    Case("C-classify-one-class", (*CLASSIFY, "--data", "{ONE_CLASS}"), ONE_CLASS_HINT, group="data"),
    Case("C-classify-eval-labels-unseen", (*CLASSIFY, "--data", "{LABELLED}", "--eval-data", "{UNSEEN}"), "zebra",
         group="data"),
    Case("C-from-scratch-missing", (*SCRATCH, "--from-scratch", "missing-config.json"), "missing-config.json"),
    Case("C-from-scratch-bert-config", (*SCRATCH, "--from-scratch", "{BERT_JSON}"), "llama"),
    Case("C-from-scratch-t5-config", (*SCRATCH, "--from-scratch", "{T5_JSON}"), "llama"),
    # --- D. corrupt inputs -------------------------------------------------------------------------------------
    Case("D-weights-truncated", ("prune", "--model", "{TRUNCATED}", *CAL), "safetensors", group="loading+export"),
    Case("D-weights-garbage", PRUNE_TRIP, "safetensors", group="loading+export"),
    Case("D-config-not-json", ("prune", "--model", "{CONFIG_NOT_JSON}", *CAL), "config.json", group="loading+export"),
    Case("D-config-t5", ("prune", "--model", "{T5}", *CAL), "llama", max_len=400, check="families",
         group="loading+export"),
    Case("D-config-model-type-nonsense", ("prune", "--model", "{NONSENSE}", *CAL), "nonsense", group="loading+export"),
    Case("D-gguf-truncated", ("prune", "--model", "{GGUF_TRUNCATED}", *CAL), "smollm2-truncated.gguf",
         check="no_gguf_cache_debris", group="loading+export"),
    Case("D-info-real-gguf", ("info", "{GGUF}"), kind="ok", group="cli.py validation"),
    Case("D-resume-ok", RESUME, kind="ok", local=("ck",), new=("ck/**",), group="trainer checkpoints"),
    Case("D-resume-weights-truncated", RESUME, "safetensors", local=("ck_weights_truncated",),
         group="trainer checkpoints"),
    Case("D-resume-state-json-garbage", RESUME, "trainer_state.json", local=("ck_state_garbage",),
         group="trainer checkpoints"),
    Case("D-resume-optimizer-missing", RESUME, "optimizer", local=("ck_optimizer_missing",),
         group="trainer checkpoints"),
    Case("D-resume-other-model", (*RESUME[:2], "{TINY_B}", *RESUME[3:]), "model", local=("ck",),
         group="trainer checkpoints"),
    # --- F. warnings: the run completes, one warning line ---------------------------------------------------------
    Case("F-spp-on-dense-model-warns", ("finetune", "--model", "{TINY}", "--method", "spp", *TRAINING, "--steps", "1"),
         "zero", kind="warn"),
    Case("F-calib-binary", (*PRUNE, "--calib", "{RANDOM_BIN}"), "random.bin", kind="error-or-warn"),
    # --- G. positive control ---------------------------------------------------------------------------------------
    Case("G-compute-dtype-auto", (*PRUNE, "--compute-dtype", "auto", "--json", "out.json"), kind="ok",
         new=("out.json",), check="compute_dtype"),
]


@dataclass(frozen=True)
class Interrupt:
    id: str
    argv: tuple[str, ...]
    marker: str  # regex searched in stdout + stderr before signalling
    signal: int
    local: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()  # local fixtures that must keep every file's hash
    rerun: tuple[str, ...] | None = None  # after SIGKILL: the next run writing the same output
    group: str = "loading+export"


#: {MEDIUM}: a 6-block Llama of 65M parameters (260 MB): pruning and saving it take long enough to be interrupted
MEDIUM_PRUNE = ("prune", "--model", "{MEDIUM}", "--method", "sparsegpt", *CAL, "--output", "out")
MEDIUM_SAVE = ("prune", "--model", "{MEDIUM}", "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--output",
               "out", "--overwrite")
TINY_SAVE = ("prune", "--model", "{TINY}", "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--output", "out",
             "--overwrite")
FINETUNE_LONG = ("finetune", "--model", "{TINY}", "--method", "spp", *TRAINING, "--steps", "1000", "--output", "out")
PRUNING = r"sparsegpt \S+:\s+\d+%|block \d+/\d+"  # the pruning loop's progress bar, or its first block
STEP = r"\b[1-9]\d*/1000\b"
WRITING = r"Writing model shards"

INTERRUPTS = [
    Interrupt("E-prune-sigint", MEDIUM_PRUNE, PRUNING, signal.SIGINT, group="cli.py validation"),
    Interrupt("E-prune-sigterm", MEDIUM_PRUNE, PRUNING, signal.SIGTERM, group="cli.py validation"),
    Interrupt("E-prune-sigkill", MEDIUM_PRUNE, PRUNING, signal.SIGKILL, rerun=TINY_SAVE),
    Interrupt("E-finetune-sigint", FINETUNE_LONG, STEP, signal.SIGINT, group="trainer checkpoints"),
    Interrupt("E-finetune-sigkill", FINETUNE_LONG, STEP, signal.SIGKILL, rerun=TINY_SAVE),
    Interrupt("E-save-overwrite-sigint", MEDIUM_SAVE, WRITING, signal.SIGINT, local=("old_output",),
              unchanged=("out",)),
    Interrupt("E-save-overwrite-sigkill", MEDIUM_SAVE, WRITING, signal.SIGKILL, local=("old_output",),
              unchanged=("out",), rerun=TINY_SAVE),
]

# ------------------------------------------------------------------------------------------------ fixtures

SHARED = ("TINY", "TINY_B", "TRIP", "TRUNCATED", "CONFIG_NOT_JSON", "T5", "NONSENSE", "GGUF", "GGUF_TRUNCATED",
          "SMALL", "EMPTY_TXT", "WHITESPACE_TXT", "RANDOM_BIN", "LABELLED", "ONE_CLASS", "UNSEEN", "BERT_JSON",
          "T5_JSON", "MEDIUM", "FIX")
WORDS = ("the of and a to in is was for on that by with as from at his an were are which this be or has also had its "
         "first their not but one new after who two been other all river city music war king science game law").split()


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _tiny_llama(path: Path, tokenizer_dir: Path, seed: int, hidden: int = 64, layers: int = 2,
                tied: bool = True) -> Path:
    """The conftest's tiny Llama (hidden 64, FFN 128, 2 layers): with another seed, same shapes and other
    weights; or wider and deeper."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)


def build_shared(root: Path, tiny_dir: Path, smol_dir: Path) -> dict[str, Path]:
    """The read-only fixtures, once per session (a few seconds)."""
    from transformers import BertConfig, T5Config, T5ForConditionalGeneration

    from sparseforge.assets import embedded_model_gguf

    fx = {"FIX": root, "TINY": Path(tiny_dir), "GGUF": embedded_model_gguf()}
    fx["TINY_B"] = _tiny_llama(root / "tiny-b", smol_dir, seed=1)
    fx["MEDIUM"] = _tiny_llama(root / "medium", smol_dir, seed=2, hidden=512, layers=6, tied=False)
    # the tripwire: a valid config and tokenizer, garbage weights; reaching the weights is a load error
    trip = _copy_model(tiny_dir, root / "tripwire-garbage-weights")
    size = (trip / "model.safetensors").stat().st_size
    (trip / "model.safetensors").write_bytes(random.Random(0).randbytes(size))
    fx["TRIP"] = trip
    truncated = _copy_model(tiny_dir, root / "weights-truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    fx["TRUNCATED"] = truncated
    not_json = _copy_model(tiny_dir, root / "config-not-json")
    (not_json / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,\n  oops this is not json')
    fx["CONFIG_NOT_JSON"] = not_json
    nonsense = _copy_model(tiny_dir, root / "model-type-nonsense")
    config = json.loads((nonsense / "config.json").read_text())
    config.update(model_type="nonsense", architectures=["NonsenseForCausalLM"])
    (nonsense / "config.json").write_text(json.dumps(config, indent=2))
    fx["NONSENSE"] = nonsense
    t5 = root / "tiny-t5"
    t5_config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(t5_config).save_pretrained(t5)
    _tokenizer_files(tiny_dir, t5)
    fx["T5"] = t5
    gguf_truncated = root / "smollm2-truncated.gguf"
    with open(fx["GGUF"], "rb") as f:
        gguf_truncated.write_bytes(f.read(1024))
    fx["GGUF_TRUNCATED"] = gguf_truncated

    rng = random.Random(0)
    small = root / "small.txt"
    small.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(150)).capitalize() + "." for _ in range(24)))
    fx["SMALL"] = small
    (root / "empty.txt").write_text("")
    fx["EMPTY_TXT"] = root / "empty.txt"
    (root / "whitespace.txt").write_text("   \n\n\t  \n \r\n   \n")
    fx["WHITESPACE_TXT"] = root / "whitespace.txt"
    (root / "random.bin").write_bytes(random.Random(1).randbytes(64 * 1024))
    fx["RANDOM_BIN"] = root / "random.bin"

    def jsonl(name: str, labels: list[str]) -> Path:
        path = root / name
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(20)), "label": label}) + "\n"
                                for label in labels))
        return path

    fx["LABELLED"] = jsonl("labelled.jsonl", ["sports", "music", "science"] * 12)
    fx["ONE_CLASS"] = jsonl("one-class.jsonl", ["sports"] * 30)
    fx["UNSEEN"] = jsonl("unseen.jsonl", ["zebra", "sports", "zebra", "music"])
    (root / "bert-config.json").write_text(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                      intermediate_size=128).to_json_string())
    fx["BERT_JSON"] = root / "bert-config.json"
    (root / "t5-config.json").write_text(t5_config.to_json_string())
    fx["T5_JSON"] = root / "t5-config.json"
    assert set(fx) == set(SHARED)
    return fx


def _damage_all(ck: Path, damage) -> None:
    steps = sorted(ck.glob("step-*"))
    assert steps, f"no checkpoint in {ck}"
    for step in steps:
        damage(step)


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


LOCAL = {
    "report_dir": lambda cwd, fx: (cwd / "report").mkdir(),
    "afile": lambda cwd, fx: (cwd / "afile").write_text("a regular file\n"),
    "model_copy": lambda cwd, fx: _copy_model(fx["TINY"], cwd / "model"),
    "old_output": lambda cwd, fx: _copy_model(fx["TINY"], cwd / "out"),
    "empty_model_dir": lambda cwd, fx: (cwd / "empty-model").mkdir(),
    "ck": lambda cwd, fx: shutil.copytree(fx["FIX"] / "ck-src", cwd / "ck"),
    "ck_weights_truncated": lambda cwd, fx: (shutil.copytree(fx["FIX"] / "ck-src", cwd / "ck"),
                                             _damage_all(cwd / "ck", lambda s: _truncate(s / "model.safetensors"))),
    "ck_state_garbage": lambda cwd, fx: (shutil.copytree(fx["FIX"] / "ck-src", cwd / "ck"),
                                         _damage_all(cwd / "ck", lambda s: (s / "trainer_state.json").write_bytes(
                                             b'{"step": 2, "identity": {\x00\xff garbage'))),
    "ck_optimizer_missing": lambda cwd, fx: (shutil.copytree(fx["FIX"] / "ck-src", cwd / "ck"),
                                             _damage_all(cwd / "ck", lambda s: (s / "optimizer.bin").unlink())),
}
NEEDS_CHECKPOINT = {"ck", "ck_weights_truncated", "ck_state_garbage", "ck_optimizer_missing"}


def substitute(argv, fx: dict[str, Path]) -> list[str]:
    def one(arg: str) -> str:
        return re.sub(r"\{([A-Z_0-9]+)\}", lambda m: str(fx[m.group(1)]), arg)

    return [one(a) for a in argv]


def snapshot(root: Path) -> set[str]:
    """Every name under ``root``, recursively, hidden ones included (directories end with '/')."""
    names = set()
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        names.update(f"{rel / d}/" for d in dirnames)
        names.update(str(rel / f) for f in filenames)
    return {n[2:] if n.startswith("./") else n for n in names}


def digests(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[str(path.relative_to(root))] = h.hexdigest()
    return out


def _allowed(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith("/**") and name.startswith(pattern[:-2]):
            return True
        if name.rstrip("/") == pattern.rstrip("/"):
            return True
    return False


# ------------------------------------------------------------------------------------------------ runners


class Handle:
    """A started CLI run: its pid (a process-group leader) and a blocking ``wait`` -> (returncode, timed_out)."""

    def __init__(self, pid: int, wait):
        self.pid, self._wait = pid, wait

    def wait(self) -> tuple[int | None, bool]:
        return self._wait()


class FreshRunner:
    """``python -m sparseforge ARGV`` in a new session."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def start(self, argv, cwd: Path, out: Path, err: Path, env=None, timeout=CASE_TIMEOUT) -> Handle:
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen([sys.executable, "-m", "sparseforge", *argv], cwd=cwd, stdout=o, stderr=e,
                                    stdin=subprocess.DEVNULL, env={**self.env, **(env or {})}, start_new_session=True)

        def wait():
            try:
                return proc.wait(timeout=timeout), False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return proc.returncode, True

        return Handle(proc.pid, wait)

    def close(self):
        pass


class ZygoteRunner:
    """Children of tests/faults_zygote.py (torch, transformers and sparseforge imported once)."""

    def __init__(self, env: dict[str, str], log: Path):
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, str(ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, env=env, cwd=log.parent, start_new_session=True)
        self.lock = threading.Lock()
        self.next_id = 0
        self.started: dict[int, Future] = {}
        self.finished: dict[int, Future] = {}
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self.ready.set()
            elif "pid" in message:
                self.started[message["id"]].set_result(message["pid"])
            else:
                self.finished[message["id"]].set_result(message)
        error = RuntimeError(f"the fork server stopped (exit {self.proc.wait()}); see {self._log.name}")
        for futures in (self.started, self.finished):
            for f in futures.values():
                if not f.done():
                    f.set_exception(error)

    def start(self, argv, cwd: Path, out: Path, err: Path, env=None, timeout=CASE_TIMEOUT) -> Handle:
        with self.lock:
            rid = self.next_id
            self.next_id += 1
            self.started[rid], self.finished[rid] = Future(), Future()
            request = dict(id=rid, argv=list(argv), cwd=str(cwd), stdout=str(out), stderr=str(err), timeout=timeout,
                           env=env or {})
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        pid = self.started[rid].result(timeout=timeout + 60)

        def wait():
            message = self.finished[rid].result(timeout=timeout + 60)
            return message["returncode"], message["timed_out"]

        return Handle(pid, wait)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()
        self._log.close()


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Result:
    argv: list[str]
    returncode: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    new: list[str] = field(default_factory=list)  # names that appeared in the working directory
    gone: list[str] = field(default_factory=list)  # names that vanished
    changed: list[str] = field(default_factory=list)  # pre-existing files whose sha256 changed
    setup_error: str | None = None
    notes: list[str] = field(default_factory=list)  # scenario findings (interrupts)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _observe(handle: Handle, out: Path, err: Path) -> tuple[int | None, bool, str, str]:
    code, timed_out = handle.wait()
    return code, timed_out, _read(out), _read(err)


def run_case(case: Case, fx, runner, logs: Path, checkpoint: Future | None) -> Result:
    cwd = fx["FIX"].parent / "runs" / case.id
    cwd.mkdir(parents=True)
    argv = substitute(case.argv, fx)
    result = Result(argv=argv)
    try:
        if NEEDS_CHECKPOINT & set(case.local):
            built = checkpoint.result()
            if built.returncode != 0 or not list((fx["FIX"] / "ck-src").glob("step-*")):
                raise RuntimeError(f"building the checkpoint failed (exit {built.returncode}): "
                                   f"{_last_line(built.stderr)}")
        for name in case.local:
            LOCAL[name](cwd, fx)
    except Exception as e:  # noqa: BLE001
        result.setup_error = f"{type(e).__name__}: {e}"
        return result
    before_names, before_digests = snapshot(cwd), digests(cwd)
    out, err = logs / f"{case.id}.out", logs / f"{case.id}.err"
    started = time.monotonic()
    handle = runner.start(argv, cwd, out, err)
    result.returncode, result.timed_out, result.stdout, result.stderr = _observe(handle, out, err)
    result.seconds = round(time.monotonic() - started, 2)
    after_names = snapshot(cwd)
    result.new = sorted(n for n in after_names - before_names if not _allowed(n, case.new))
    result.gone = sorted(n for n in before_names - after_names if not _allowed(n, case.new))
    after_digests = digests(cwd)
    result.changed = sorted(k for k, v in before_digests.items()
                            if k in after_digests and after_digests[k] != v and not _allowed(k, case.new))
    return result


def _wait_for(pattern: str, out: Path, err: Path, handle_done, limit: float) -> bool:
    deadline = time.monotonic() + limit
    regex = re.compile(pattern)
    while time.monotonic() < deadline and not handle_done():
        if regex.search(_read(err)) or regex.search(_read(out)):
            return True
        time.sleep(0.02)
    return False


def run_interrupt(sc: Interrupt, fx, runner, rerunner, logs: Path) -> Result:
    """Start, wait for the marker, signal the process group, then look at what is left."""
    cwd = fx["FIX"].parent / "runs" / sc.id
    cwd.mkdir(parents=True)
    argv = substitute(sc.argv, fx)
    result = Result(argv=argv)
    for name in sc.local:
        LOCAL[name](cwd, fx)
    before_names = snapshot(cwd)
    kept = {name: digests(cwd / name) for name in sc.unchanged}
    out, err = logs / f"{sc.id}.out", logs / f"{sc.id}.err"
    started = time.monotonic()
    handle = runner.start(argv, cwd, out, err, env={"PYTHONUNBUFFERED": "1"})
    box: dict = {}
    waiter = threading.Thread(target=lambda: box.update(zip(("code", "timed_out"), handle.wait())), daemon=True)
    waiter.start()
    if not _wait_for(sc.marker, out, err, lambda: not waiter.is_alive(), limit=90):
        result.notes.append(f"the marker /{sc.marker}/ never appeared"
                            + (" (the run ended first)" if not waiter.is_alive() else ""))
        if waiter.is_alive():
            os.killpg(handle.pid, signal.SIGKILL)
    else:
        try:
            os.killpg(handle.pid, sc.signal)
        except ProcessLookupError:
            result.notes.append("the run ended before the signal")
    waiter.join(timeout=60)
    if waiter.is_alive():
        os.killpg(handle.pid, signal.SIGKILL)
        result.notes.append("the run did not stop within 60 s of the signal")
        waiter.join()
    result.returncode, result.timed_out = box.get("code"), box.get("timed_out", False)
    result.stdout, result.stderr = _read(out), _read(err)
    result.seconds = round(time.monotonic() - started, 2)
    after_names = snapshot(cwd)
    new = sorted(after_names - before_names)
    for name, old in kept.items():
        now = digests(cwd / name) if (cwd / name).is_dir() else {}
        if now != old:
            result.notes.append(f"the old {name}/ was not kept intact: "
                                f"{sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))[:5]}")
    stale = [n for n in new if n.split("/")[0].startswith(".")]
    result.new = [n for n in new if not n.split("/")[0].startswith(".")]
    result.gone = sorted(before_names - after_names)
    if stale and sc.signal != signal.SIGKILL:
        result.notes.append(f"hidden debris after {signal.Signals(sc.signal).name}: {_top(stale)}")
    if sc.signal == signal.SIGKILL and stale:
        # allowed after SIGKILL, but the next run writing the same output must clean it up
        out2, err2 = logs / f"{sc.id}.rerun.out", logs / f"{sc.id}.rerun.err"
        code2, timed2, _, stderr2 = _observe(rerunner.start(substitute(sc.rerun, fx), cwd, out2, err2), out2, err2)
        if code2 != 0 or timed2:
            result.notes.append(f"the rerun failed (exit {code2}): {_last_line(stderr2)}")
        hidden = [n for n in snapshot(cwd) if n.split("/")[0].startswith(".")]
        if hidden:
            result.notes.append(f"stale hidden siblings left by SIGKILL {_top(stale)} are still there after the "
                                f"next successful run: {_top(hidden)}")
    return result


def _top(names) -> list[str]:
    return sorted({n.split("/")[0] for n in names})


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(empty)"


@pytest.fixture(scope="session")
def _runner(tmp_path_factory):
    """The fork server, started first: it imports while the conftest and the fixtures build the models."""
    session = tmp_path_factory.mktemp("faults")
    (session / "logs").mkdir()
    env = {**os.environ, **ENV}
    env.pop("PYTHONUNBUFFERED", None)
    runner = FreshRunner(env) if FRESH else ZygoteRunner(env, session / "logs" / "zygote.log")
    yield runner, session
    runner.close()


def _order(case: Case) -> int:
    """Longest first: the runs that load a model, then the checkpoint users (built meanwhile), then refusals."""
    if case.id == "D-info-real-gguf":
        return 0
    if NEEDS_CHECKPOINT & set(case.local):
        return 2
    return 3 if case.before or "{TRIP}" in " ".join(case.argv) else 1


def _selected(session) -> set[str]:
    """The case and interrupt ids of the collected tests (``-k`` runs only what it selects)."""
    ids = {item.callspec.id for item in session.items
           if getattr(item, "originalname", None) in ("test_fault", "test_interrupt") and hasattr(item, "callspec")}
    if any(c.before == "load" for c in CASES if c.id in ids):
        ids.add("D-weights-garbage")  # the tripwire's own load error, which those are compared with
    return ids


@pytest.fixture(scope="session")
def faults(request, _runner, tiny_dir, smol_dir):
    """Build the fixtures, then run every selected case and interrupt concurrently; {id: Result} + the fixtures."""
    runner, session = _runner
    selected = _selected(request.session)
    cases = [c for c in CASES if c.id in selected]
    interrupts = [sc for sc in INTERRUPTS if sc.id in selected]
    root, logs = session / "fixtures", session / "logs"
    root.mkdir()
    fx = build_shared(root, tiny_dir, smol_dir)
    shared_before = {name: digests(fx[name]) if fx[name].is_dir() else digests_file(fx[name])
                     for name in SHARED if name not in ("FIX", "GGUF", "MEDIUM")}  # MEDIUM: the interrupts only
    gguf_cache_before = _gguf_cache_entries()
    started = time.monotonic()
    results: dict[str, Result] = {}
    with ThreadPoolExecutor(WORKERS) as pool:
        ck_logs = (logs / "make-checkpoint.out", logs / "make-checkpoint.err")

        def make_checkpoint() -> Result:
            argv = substitute(MAKE_CHECKPOINT, fx)
            code, timed_out, out, err = _observe(runner.start(argv, root, *ck_logs), *ck_logs)
            return Result(argv=argv, returncode=code, timed_out=timed_out, stdout=out, stderr=err)

        checkpoint = pool.submit(make_checkpoint) if any(NEEDS_CHECKPOINT & set(c.local) for c in cases) else None
        futures = {sc.id: pool.submit(run_interrupt, sc, fx, runner, runner, logs) for sc in interrupts}
        ordered = sorted(cases, key=_order)
        futures.update({c.id: pool.submit(run_case, c, fx, runner, logs, checkpoint) for c in ordered})
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except Exception as e:  # noqa: BLE001
                results[key] = Result(argv=[], setup_error=f"{type(e).__name__}: {e}")
    elapsed = time.monotonic() - started
    shared_changed = {name: sorted(k for k, v in old.items()
                                   if (digests(fx[name]) if fx[name].is_dir() else digests_file(fx[name])).get(k) != v)
                      for name, old in shared_before.items()}
    (session / "timing.txt").write_text(f"{len(results)} runs in {elapsed:.1f}s\n" + "".join(
        f"{k} {r.seconds}\n" for k, r in results.items()))
    return dict(results=results, fx=fx, shared_changed={k: v for k, v in shared_changed.items() if v},
                gguf_cache_new=sorted(_gguf_cache_entries() - gguf_cache_before), elapsed=elapsed)


def digests_file(path: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}


def _gguf_cache_entries() -> set[str]:
    from sparseforge.assets import cache_dir

    models = cache_dir() / "models"
    return {p.name for p in models.iterdir() if "truncated" in p.name} if models.is_dir() else set()


# ------------------------------------------------------------------------------------------------ checks


def _normalise(text: str, fx) -> str:
    """The temporary root (whose name has digits: pytest-87) and the GGUF's directory by placeholders, so
    hints are matched on what the message says, file names included."""
    for prefix, placeholder in ((fx["FIX"].parent.parent, "<tmp>"), (fx["GGUF"].parent, "<site>")):
        text = text.replace(str(prefix), placeholder)
    return text


def _hint_found(line: str, hint) -> bool:
    hints = (hint,) if isinstance(hint, str) else tuple(hint)
    return not hints or any(h.lower() in line.lower() for h in hints)


def _error_problems(r: Result, case: Case, fx, tripwire_error: str | None) -> list[str]:
    problems = []
    if r.returncode != 2:
        problems.append(f"exit status {r.returncode}, expected 2")
    if "Traceback" in r.stderr:
        problems.append("a traceback on stderr")
    lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
    count = r.stderr.count(ERROR)
    if count != 1:
        problems.append(f"{count} '{ERROR}' lines, expected exactly one")
    if not lines or not lines[-1].startswith(ERROR):
        problems.append(f"the last stderr line does not start with '{ERROR}': {lines[-1][:200] if lines else '(empty)'}")
    error_lines = [_normalise(line, fx) for line in lines if line.startswith(ERROR)]
    message = error_lines[-1] if error_lines else ""
    if message and not _hint_found(message, case.hint):
        problems.append(f"the message does not mention {case.hint!r}")
    if case.max_len and len(message) > case.max_len:
        problems.append(f"the message is {len(message)} characters long (at most {case.max_len})")
    if case.before == "load" and tripwire_error and _last_line(_normalise(r.stderr, fx)) == tripwire_error:
        problems.append("not refused before the weights load: the run ended in the {TRIP} model's load error")
    if case.before == "work" and r.stdout.strip():
        problems.append(f"the work ran before the refusal: stdout {r.stdout.strip().splitlines()[0][:120]!r}")
    return problems


def _warning_problems(r: Result, case: Case, fx) -> list[str]:
    problems = []
    if r.returncode != 0:
        problems.append(f"exit status {r.returncode}, expected 0 (a warning, the run completes)")
    if "Traceback" in r.stderr:
        problems.append("a traceback on stderr")
    warnings = [_normalise(line, fx) for line in r.stderr.splitlines() if "warning" in line.lower()]
    if not any(_hint_found(w, case.hint) for w in warnings):
        problems.append(f"no stderr line says 'warning' and mentions {case.hint!r}")
    return problems


def _check_families(r: Result, fx) -> list[str]:
    line = next((line for line in r.stderr.splitlines() if line.startswith(ERROR)), "")
    named = [f for f in ("llama", "mistral", "qwen2", "opt", "gpt2", "bert") if re.search(rf"\b{f}\b", line.lower())]
    return [] if len(named) >= 3 else [f"the message does not list the supported families (names {named})"]


def _check_compute_dtype(r: Result, fx) -> list[str]:
    path = fx["FIX"].parent / "runs" / "G-compute-dtype-auto" / "out.json"
    if not path.is_file():
        return ["no out.json written"]
    try:
        payload = json.loads(path.read_text())
    except ValueError as e:
        return [f"out.json is not JSON: {e}"]
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "compute_dtype":
                    found.append(v)
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(payload)
    concrete = [v for v in found if v in ("float32", "bfloat16", "float16")]
    return [] if concrete else [f"out.json does not record the chosen compute dtype (compute_dtype values: {found})"]


CHECKS = {"families": _check_families, "compute_dtype": _check_compute_dtype, "no_gguf_cache_debris": None}


def _context(r: Result, group: str) -> str:
    return (f"\n--- to change: {group}\n--- argv: sparseforge {' '.join(r.argv)}\n--- exit {r.returncode} in {r.seconds}s"
            f"\n--- stderr (tail):\n{r.stderr[-1500:]}\n--- stdout (tail):\n{r.stdout[-400:]}")


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_fault(faults, case: Case):
    r: Result = faults["results"][case.id]
    fx = faults["fx"]
    assert r.setup_error is None, f"fixture for {case.id} could not be built: {r.setup_error}"
    garbage = faults["results"].get("D-weights-garbage")
    tripwire_error = _last_line(_normalise(garbage.stderr, fx)) if garbage is not None and garbage.stderr else None
    problems = ["timed out"] if r.timed_out else []
    if case.kind == "error":
        problems += _error_problems(r, case, fx, tripwire_error)
    elif case.kind == "warn":
        problems += _warning_problems(r, case, fx)
    elif case.kind == "error-or-warn":
        problems += _warning_problems(r, case, fx) if r.returncode == 0 else _error_problems(r, case, fx, None)
    else:  # ok
        if r.returncode != 0:
            problems.append(f"exit status {r.returncode}, expected 0: {_last_line(r.stderr)}")
        if "Traceback" in r.stderr:
            problems.append("a traceback on stderr")
    if r.new:
        problems.append(f"left behind: {r.new[:8]}")
    if r.gone or r.changed:
        problems.append(f"inputs changed: removed {r.gone[:5]}, modified {r.changed[:5]}")
    used = set(re.findall(r"\{([A-Z_0-9]+)\}", " ".join(case.argv)))
    for name in sorted(used & set(faults["shared_changed"])):
        problems.append(f"shared input {{{name}}} changed during the session: {faults['shared_changed'][name][:5]}")
    if case.check == "no_gguf_cache_debris" and faults["gguf_cache_new"]:
        problems.append(f"the truncated GGUF left entries in the model cache: {faults['gguf_cache_new']}")
    elif case.check in CHECKS and CHECKS[case.check] is not None:
        problems += CHECKS[case.check](r, fx)
    assert not problems, "; ".join(problems) + _context(r, case.group)


@pytest.mark.parametrize("sc", INTERRUPTS, ids=[s.id for s in INTERRUPTS])
def test_interrupt(faults, sc: Interrupt):
    r: Result = faults["results"][sc.id]
    assert r.setup_error is None, r.setup_error
    problems = list(r.notes)
    if sc.signal == signal.SIGKILL:
        if r.returncode != -signal.SIGKILL:
            problems.append(f"exit status {r.returncode}, expected death by SIGKILL (the signal came too late?)")
    else:
        expected = (130,) if sc.signal == signal.SIGINT else (143, 130)
        if r.returncode not in expected:
            problems.append(f"exit status {r.returncode}, expected {' or '.join(map(str, expected))}")
        if "Traceback" in r.stderr:
            problems.append("a traceback on stderr")
        lines = [line.strip() for line in r.stderr.splitlines() if line.strip()]
        if r.stderr.count("sparseforge:") != 1:
            problems.append(f"{r.stderr.count('sparseforge:')} 'sparseforge:' lines on stderr, expected one")
        if not lines or not lines[-1].startswith("sparseforge:"):
            problems.append(f"the last stderr line is not the CLI's: {lines[-1][:160] if lines else '(empty)'}")
    if r.new:
        problems.append(f"left behind: {_top(r.new)}")
    if r.gone:
        problems.append(f"removed: {_top(r.gone)}")
    assert not problems, "; ".join(problems) + _context(r, sc.group)
