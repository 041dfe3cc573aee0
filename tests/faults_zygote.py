"""Fork server for tests/test_faults.py: pays the ~4 s import of torch + transformers once, then runs each
requested ``sparseforge`` command line in a forked child process.

The child does what ``python -m sparseforge ARGS`` does: a new session, its own working directory, stdin
from /dev/null, stdout and stderr to files, ``sys.argv`` and ``sys.path[0]`` as ``-m`` sets them, and
``runpy`` runs ``sparseforge.__main__`` (so ``cli.main`` and its error handling are the real ones). What
the interpreter does at the top level is reproduced: ``SystemExit`` gives its code, an uncaught exception
prints its traceback and exits 1, an uncaught KeyboardInterrupt dies of SIGINT, atexit handlers run.
Signals sent to the child's process group reach the CLI exactly as they would reach a fresh interpreter.

Protocol (one JSON object per line): requests on stdin ``{"id", "argv", "cwd", "stdout", "stderr",
"timeout", "env"}``; on the protocol fd: ``{"id", "pid"}`` once started, then ``{"id", "returncode",
"seconds", "timed_out"}`` (returncode as ``subprocess``: negative = killed by that signal).
Stdin's end stops the server (its running children are killed).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys
import time

# everything the CLI's commands import lazily, loaded once here (a module that fails to import is left for
# the child to fail on, with the traceback a fresh interpreter would print)
PRELOAD = (
    "torch", "transformers", "accelerate", "safetensors.torch", "tokenizers", "tqdm",
    "transformers.models.llama.modeling_llama", "transformers.models.bert.modeling_bert",
    "transformers.models.t5.configuration_t5", "transformers.models.auto.modeling_auto",
    "transformers.integrations.ggml",
    "sparseforge", "sparseforge.cli", "sparseforge.api", "sparseforge.loading", "sparseforge.export",
    "sparseforge.data", "sparseforge.measure", "sparseforge.methods", "sparseforge.hardware",
    "sparseforge.oneshot", "sparseforge.oneshot.engine", "sparseforge.oneshot.methods",
    "sparseforge.sparsity.pattern", "sparseforge.peft", "sparseforge.recovery", "sparseforge.training",
    "sparseforge.train", "sparseforge.train.run", "sparseforge.train.trainer", "sparseforge.train.labelled",
    "sparseforge.lowrank.method", "sparseforge.structured", "sparseforge.structured.method",
    "sparseforge.eval.perplexity", "sparseforge.eval.classification", "sparseforge.eval.sparsity_report",
    "sparseforge.eval.speed",
)


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - the child meets the same failure and reports it
            pass


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _child(request: dict, proto_fd: int) -> None:
    """In the forked child: become ``python -m sparseforge ARGV``; never returns."""
    code = 1
    try:
        os.close(proto_fd)
        os.setsid()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(request["cwd"])
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            new = os.open(path, flags, 0o644)
            os.dup2(new, fd)
            os.close(new)
        os.environ.update(request.get("env") or {})
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
        sys.argv = ["-m", *request["argv"]]
        sys.path[0] = os.getcwd()
        import runpy
        import traceback

        try:
            runpy.run_module("sparseforge", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
        except KeyboardInterrupt:
            traceback.print_exc()
            sys.stdout.flush()
            sys.stderr.flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - what the interpreter prints for an uncaught exception
            traceback.print_exc()
            code = 1
        try:
            import atexit

            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001
                pass
    finally:
        os._exit(code)


def main() -> None:
    proto_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints of the imports must not reach the protocol
    _preload()
    proto = os.fdopen(proto_fd, "w", buffering=1)

    def send(message: dict) -> None:
        proto.write(json.dumps(message) + "\n")

    send({"ready": True})
    children: dict[int, dict] = {}
    buffer = b""
    open_input = True
    while open_input or children:
        ready, _, _ = select.select([0] if open_input else [], [], [], 0.02)
        if ready:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                open_input = False
                for pid in children:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except OSError:
                        pass
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not line.strip():
                    continue
                request = json.loads(line)
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(request, proto_fd)
                started = time.monotonic()
                children[pid] = dict(id=request["id"], started=started, timed_out=False,
                                     deadline=started + float(request.get("timeout") or 120))
                send({"id": request["id"], "pid": pid})
        now = time.monotonic()
        for pid, child in list(children.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                del children[pid]
                send({"id": child["id"], "returncode": os.waitstatus_to_exitcode(status),
                      "seconds": round(now - child["started"], 3), "timed_out": child["timed_out"]})
            elif now > child["deadline"] and not child["timed_out"]:
                child["timed_out"] = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except OSError:
                    pass


if __name__ == "__main__":
    main()
