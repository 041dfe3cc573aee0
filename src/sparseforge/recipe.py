"""Recipes: one YAML file that runs a whole pipeline — prune, finetune, train, eval, bench-speed, export — in order.

A stage ``{prune: {method: sparsegpt, pattern: "2:4"}}`` becomes the command line ``prune --method sparsegpt
--pattern 2:4 ...`` and is parsed by that subcommand's own parser, so a recipe accepts exactly what the command
accepts and refuses it with the same message, prefixed with the stage. Every stage is parsed and put through the
checks its command runs before loading any weights, before the first stage runs. Each stage's model is the
previous one's output; outputs, each stage's JSON and a combined report (report.json, report.md, rewritten after
every stage) go into one directory, so a failed stage leaves the finished ones and says how to resume.

YAML scalars are read as text (PyYAML's BaseLoader): a value reaches the parser exactly as written, so
``pattern: 2:4`` is the pattern 2:4, not YAML 1.1's base-60 integer 124.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, SparseforgeError
from .validate import OneLineParser

#: the subcommands a stage can be, in the order a pipeline usually runs them
STAGE_KINDS = ("prune", "finetune", "train", "eval", "bench-speed", "export", "info")
#: stages whose output is a model directory (the next stage's input); the others write only JSON
MAKES_MODEL = ("prune", "finetune", "train", "export")
#: the recipe decides where every stage writes
OWNED = ("output", "json", "overwrite")
TOP_LEVEL = ("model", "output", "seed", "defaults", "stages")
UNSET = ("", "~", "null")  # a value that means "the command's default"
REPORT_JSON, REPORT_MD = "report.json", "report.md"


class RecipeError(ConfigError):
    """A recipe that cannot run as written; the message names the stage and the fix."""


class _RaisingParser(OneLineParser):
    """The CLI's parser, raising its one-line message instead of printing it and exiting."""

    def error(self, message: str):
        raise RecipeError(message)


@dataclass
class Stage:
    index: int
    kind: str
    settings: dict  # flag name (dashes) -> text or list of texts
    argv: list[str] = field(default_factory=list)
    args: argparse.Namespace | None = None
    model: str | None = None  # input model (None: the command's default, the embedded model)
    output: Path | None = None
    json: Path | None = None

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.kind})"

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.kind}"


@dataclass
class Recipe:
    path: Path
    model: str | None
    output: str | None
    defaults: dict
    stages: list[Stage]


# ---------------------------------------------------------------- reading


def _loader():
    import yaml

    class Loader(yaml.BaseLoader):
        """Every scalar as text; a key given twice in one mapping is refused (PyYAML keeps the last silently)."""

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"'{key}' is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return Loader


def _parse_yaml(text: str, where: str):
    import yaml

    try:
        return yaml.load(text, Loader=_loader())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{where} is not valid YAML: {e.problem or e.context}{at}: fix the syntax") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{where} is not valid YAML ({' '.join(str(e).split())}): fix the syntax") from None


def _flag(key) -> str:
    if not isinstance(key, str) or not key.strip():
        raise RecipeError(f"setting name {key!r} is not a name: write 'name: value'")
    return key.strip().lstrip("-").replace("_", "-")


def _kind(text) -> str:
    return text.replace("_", "-") if isinstance(text, str) else text


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _settings(raw, where: str) -> dict:
    """A stage's (or defaults') settings with flag-form names; values text or lists of text."""
    if raw in UNSET or raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: settings must be a mapping 'name: value', not {raw!r}")
    settings = {}
    for key, value in raw.items():
        name = _flag(key)
        if name in settings:
            raise RecipeError(f"{where}: '{name}' is given twice (as '{name}' and '{key}'): keep one")
        if isinstance(value, dict) or (isinstance(value, list) and any(not isinstance(v, str) for v in value)):
            raise RecipeError(f"{where}: {key} must be a value or a list of values, not a mapping")
        settings[name] = value
    return settings


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Read ``path`` and apply ``--set KEY=VALUE`` overrides; RecipeError for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {path} not found: give the path of a recipe YAML file (see recipes/)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe {path} ({e}): check the file") from None
    raw = _parse_yaml(text, f"recipe {path}")
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), list) or not raw["stages"]:
        raise RecipeError(f"recipe {path} must be a mapping with a non-empty 'stages:' list, e.g. "
                          "'stages: [{prune: {method: wanda}}, eval]'")
    for key in raw:
        if key not in TOP_LEVEL:
            raise RecipeError(f"recipe {path}: unknown top-level key '{key}'{_suggest(str(key), TOP_LEVEL)} "
                              f"(known: {', '.join(TOP_LEVEL)})")
    stages = []
    for i, item in enumerate(raw["stages"], 1):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise RecipeError(f"stage {i}: write each stage as '- KIND: {{settings}}' with KIND one of {', '.join(STAGE_KINDS)}")
        (kind, settings), = item.items()
        if _kind(kind) not in STAGE_KINDS:
            raise RecipeError(f"stage {i}: unknown stage kind '{kind}'{_suggest(str(kind), STAGE_KINDS)} "
                              f"(known: {', '.join(STAGE_KINDS)})")
        stages.append(Stage(i, _kind(kind), _settings(settings, f"stage {i} ({_kind(kind)})")))
    defaults = _settings(raw.get("defaults"), "defaults")
    top = {key: raw.get(key) for key in ("model", "output", "seed")}
    for override in overrides:
        _apply_override(override, top, defaults, stages)
    for key, value in top.items():
        if value is not None and not isinstance(value, str):
            raise RecipeError(f"recipe {path}: {key} must be a single value")
    if top["seed"] not in UNSET and top["seed"] is not None:
        if "seed" in defaults:
            raise RecipeError(f"recipe {path}: the seed is given twice (seed: and defaults: seed:): keep one")
        defaults["seed"] = top["seed"]
    for key in defaults:
        if key in OWNED or key == "model":
            raise RecipeError(f"defaults: '{key}' is set by the recipe, not per stage: drop it"
                              + (" (the recipe's input model is the top-level 'model:')" if key == "model" else ""))
    unset = lambda value: value is None or value in UNSET  # noqa: E731
    return Recipe(path, None if unset(top["model"]) else top["model"], None if unset(top["output"]) else top["output"],
                  defaults, stages)


def _apply_override(text: str, top: dict, defaults: dict, stages: list[Stage]) -> None:
    target, sep, value_text = text.partition("=")
    selector, dot, key = target.strip().partition(".")
    if not sep or not selector:
        raise RecipeError(f"--set '{text}' is not KEY=VALUE, e.g. 'finetune.steps=8', '2.lr=1e-3' or 'model=DIR'")
    value = _parse_yaml(value_text, f"--set '{text}'") if value_text.strip() else ""
    value = "" if value is None else value
    if not dot:
        if selector not in top:
            raise RecipeError(f"--set '{text}': '{selector}' is not a top-level setting (model, output, seed); "
                              "a stage's setting is STAGE.KEY=VALUE")
        top[selector] = value
        return
    settings = _settings({key: value}, f"--set '{text}'")
    if selector == "defaults":
        defaults.update(settings)
        return
    if selector.isdigit():
        chosen = [s for s in stages if s.index == int(selector)]
        if not chosen:
            raise RecipeError(f"--set '{text}': the recipe has stages 1 to {len(stages)}, no stage {selector}")
    else:
        chosen = [s for s in stages if s.kind == _kind(selector)]
        if not chosen:
            raise RecipeError(f"--set '{text}': the recipe has no {selector} stage (its stages: "
                              f"{', '.join(s.kind for s in stages)}); use a stage number or kind")
    for stage in chosen:
        stage.settings.update(settings)


# ---------------------------------------------------------------- planning: recipe -> command lines


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(subparser: argparse.ArgumentParser) -> dict:
    """Flag name (no dashes) -> its argparse action; positionals under their dest."""
    options = {}
    for action in subparser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = [o[2:] for o in action.option_strings if o.startswith("--")] or [action.dest]
        for name in names:
            options[name] = action
    return options


def _value_args(stage: Stage, name: str, action, value) -> list[str]:
    """The command-line words of one setting: a switch appears or not, a list repeats a repeatable flag and is
    comma-joined otherwise (--targets, --tasks)."""
    if value in UNSET or value == []:
        return []
    flag = f"--{name}"
    if action.nargs == 0:  # store_true
        if not isinstance(value, str) or value.lower() not in ("true", "false"):
            raise RecipeError(f"{stage.label}: {name} is a switch: write true or false, not {value!r}")
        return [flag] if value.lower() == "true" else []
    values = value if isinstance(value, list) else [value]
    if isinstance(action, argparse._AppendAction):
        return [word for v in values for word in (flag, v)]
    return [flag, ",".join(values)]


def stage_argv(stage: Stage, settings: dict, options: dict, model, output: Path | None, json_path: Path | None) -> list[str]:
    """The command line of ``stage``: its settings as flags, then the input model and the recipe's output paths."""
    positional = {name: action for name, action in options.items() if not action.option_strings}
    argv = [stage.kind]
    if stage.kind in ("info", "export"):  # MODEL (and OUTPUT) are positional there
        if model is not None:
            argv.append(str(model))
        if stage.kind == "export":
            argv.append(str(output))
    for name, value in settings.items():
        if name in positional:
            continue
        argv += _value_args(stage, name, options[name], value)
    if model is not None and stage.kind not in ("info", "export"):
        argv += [word for m in (model if isinstance(model, list) else [model]) for word in ("--model", str(m))]
    if output is not None and stage.kind != "export":
        argv += ["--output", str(output)]
    if json_path is not None:
        argv += ["--json", str(json_path)]
    return argv


def _check_keys(stage: Stage, options: dict) -> None:
    known = [name for name in options if name not in OWNED and name != "version"]
    for name in stage.settings:
        if name in OWNED or (stage.kind == "export" and name == "output"):
            raise RecipeError(f"{stage.label}: '{name}' is set by the recipe (outputs go to <output>/{stage.name}"
                              f"{'' if stage.kind in MAKES_MODEL else '.json'}): drop it")
        if name not in options:
            raise RecipeError(f"{stage.label}: unknown setting '{name}'{_suggest(name, known)}: see "
                              f"`sparseforge {stage.kind} --help`")


def _parse(parser, stage: Stage, argv: list[str]) -> argparse.Namespace:
    try:
        return parser.parse_args(argv)
    except RecipeError as e:
        raise RecipeError(f"{stage.label}: {e}") from None


def _input_model(stage: Stage, settings: dict, current, root):
    """The model a stage reads: its own 'model:' setting, else the previous model stage's output (bench-speed: the
    recipe's input then that output, the input being the baseline of the speed-ups)."""
    if "model" in settings and settings["model"] not in UNSET:
        return settings["model"]
    if stage.kind == "train" and settings.get("from-scratch") not in (None, *UNSET):
        return None
    if stage.kind == "bench-speed" and current != root:
        return [_embedded_dir() if root is None else root, current]
    return current


def _embedded_dir() -> str:
    """The embedded model as a directory (converted once, cached): bench-speed's baseline needs a path."""
    from .assets import embedded_model_gguf
    from .loading import gguf_to_directory

    return str(gguf_to_directory(embedded_model_gguf()))


def plan(recipe: Recipe, out: Path, overwrite: bool = False, from_stage: int = 1) -> list[Stage]:
    """Every stage's command line, parsed by its subcommand's parser; RecipeError (with the stage) for a bad one."""
    parser = build_raising_parser()
    subparsers = _subparsers(parser)
    kinds = {s.kind for s in recipe.stages}
    for name in recipe.defaults:
        if not any(name in _options(subparsers[kind]) for kind in kinds):
            raise RecipeError(f"defaults: '{name}' is a setting of no stage in this recipe "
                              f"({', '.join(sorted(kinds))}): drop it or move it into a stage")
    current = recipe.model
    for stage in recipe.stages:
        options = _options(subparsers[stage.kind])
        _check_keys(stage, options)
        settings = {k: v for k, v in recipe.defaults.items() if k in options and k != "model"}
        settings.update(stage.settings)
        stage.model = _input_model(stage, settings, current, recipe.model)
        settings.pop("model", None)
        stage.output = out / stage.name if stage.kind in MAKES_MODEL else None
        stage.json = out / f"{stage.name}.json" if "json" in options else None
        stage.argv = stage_argv(stage, settings, options, stage.model, stage.output, stage.json)
        if (overwrite or stage.index >= from_stage > 1) and "overwrite" in options:
            stage.argv.append("--overwrite")
        stage.args = _parse(parser, stage, stage.argv)
        stage.settings = settings
        if stage.output is not None:
            current = str(stage.output)
    return recipe.stages


def build_raising_parser() -> argparse.ArgumentParser:
    from .cli import build_parser

    return build_parser(_RaisingParser)


def check(recipe: Recipe, stages: list[Stage], from_stage: int = 1) -> None:
    """Run each stage's command up to its slow part (its own checks: numbers, paths, the pattern against the
    layers). A stage's input made by an earlier stage does not exist yet: the recipe's input stands in for it
    (pruning and fine-tuning keep every layer's shape)."""
    from .cli import COMMANDS

    parser = build_raising_parser()
    options = {kind: _options(sub) for kind, sub in _subparsers(parser).items()}
    for stage in stages:
        if stage.index < from_stage:
            continue
        model = stage.model
        if isinstance(model, list):
            model = [m if Path(m).exists() or not _made_here(m, stages) else recipe.model for m in model]
            model = [m for m in model if m is not None] or None
        elif model is not None and not Path(model).exists() and _made_here(model, stages):
            model = recipe.model
        # JSON files go into the recipe's directory, which the recipe checks and creates itself
        argv = stage_argv(stage, stage.settings, options[stage.kind], model, stage.output, None)
        if "--overwrite" in stage.argv:
            argv.append("--overwrite")
        args = _parse(parser, stage, argv)
        args.check_only = True
        try:
            COMMANDS[stage.kind](args)
        except SparseforgeError as e:
            raise RecipeError(f"{stage.label}: {' '.join(str(e).split())}") from None


def _made_here(model: str, stages: list[Stage]) -> bool:
    return any(s.output is not None and str(s.output) == str(model) for s in stages)


# ---------------------------------------------------------------- the report


def describe(stage: Stage) -> str:
    """What a stage does, in a few words, from its parsed settings."""
    a = stage.args
    if stage.kind == "prune":
        return f"{a.method} {a.pattern or a.sparsity or '0.5'}" + (f", {len(a.override)} overrides" if a.override else "") \
            + (f", {len(a.skip)} skipped" if a.skip else "") + (f", first {a.block_fraction:g} of blocks" if a.block_fraction < 1 else "")
    if stage.kind == "finetune":
        return (f"prune {a.prune} {a.pattern or a.sparsity or '0.5'}, then " if a.prune else "") + f"{a.method}, {a.steps} steps"
    if stage.kind == "train":
        from .methods import train_family

        target = {"losparse": f"keep {a.keep:g}", "transpa": f"target {a.target_params:g}"}.get(train_family(a.method), "")
        return f"{a.method} ({a.task}{', ' + target if target else ''}), {a.steps} steps"
    if stage.kind == "eval":
        tasks = getattr(a, "tasks", None)  # lm-evaluation-harness tasks, where the command has them
        return f"on {a.data or 'the default data'}" + (f", tasks {tasks}" if tasks else "")
    if stage.kind == "bench-speed":
        return f"{len(a.model or [None])} model(s), {a.prefill_tokens} prefill / {a.decode_tokens} decode tokens"
    if stage.kind == "export":
        return f"to {a.format}"
    return "sparsity summary"


def _ppl(entry) -> str:
    return f"{entry['perplexity']:.2f}" if isinstance(entry, dict) and entry.get("perplexity") is not None else "-"


def _quality(entry) -> str:
    if not isinstance(entry, dict):
        return "-"
    if entry.get("accuracy") is not None:
        return f"accuracy {entry['accuracy']:.4f}"
    return f"perplexity {_ppl(entry)}"


def key_numbers(kind: str, result: dict | None) -> str:
    """The numbers a reader looks for first in a stage's JSON result."""
    if not result:
        return "-"
    m = result.get("metrics") or {}
    if kind == "prune":
        return f"sparsity {m.get('sparsity', 0):.4f}; perplexity {_ppl(m.get('dense'))} → {_ppl(m.get('pruned'))}"
    if kind == "finetune":
        kept = {True: "zero pattern kept", False: "ZERO PATTERN CHANGED"}.get(m.get("pattern_identical"), "")
        return f"perplexity {_ppl(m.get('pruned'))} → {_ppl(m.get('finetuned'))}; {kept}"
    if kind == "train":
        size = m.get("parameters") or {}
        before, after = (size.get(k, {}).get("parameters") for k in ("before", "after"))
        sizes = f"; parameters {before:,} → {after:,}" if before and after else ""
        return f"{_quality(m.get('before'))} → {_quality(m.get('after'))}{sizes}"
    if kind == "eval":
        parts = []
        if result.get("accuracy") is not None:
            parts.append(f"accuracy {result['accuracy']:.4f}, macro-F1 {result.get('macro_f1', float('nan')):.4f}")
        elif result.get("perplexity") is not None:
            parts.append(f"perplexity {result['perplexity']:.2f}")
        tasks = result.get("tasks")
        if isinstance(tasks, dict):  # lm-evaluation-harness tasks: acc_norm where the task has it, else acc
            for task, scores in tasks.items():
                metric = next((m for m in ("acc_norm", "acc") if isinstance(scores, dict) and scores.get(m) is not None), None)
                if metric:
                    parts.append(f"{task} {metric} {scores[metric]:.4f}")
        return "; ".join(parts) or "-"
    if kind == "bench-speed":
        return "; ".join(f"{e['label']}: prefill {e['prefill_tokens_per_s']:.0f} tok/s (x{e['speedup_prefill']:.2f})"
                         for e in result.get("models", []) if e.get("prefill_tokens_per_s"))
    if kind == "info":
        return f"{result.get('prunable_sparsity', 0):.2%} zeros in the block linears"
    if kind == "export":
        return result.get("format", "-")
    return "-"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def render_markdown(report: dict) -> str:
    lines = [f"# Recipe {report['recipe']}", "", f"Output: `{report['output']}`", "",
             "| stage | did | key numbers | seconds | status |", "|---|---|---|---:|---|"]
    for e in report["stages"]:
        seconds = f"{e['seconds']:.1f}" if e.get("seconds") is not None else "-"
        lines.append(f"| {e['name']} | {e['kind']}: {e['did']} | {key_numbers(e['kind'], e.get('result'))} | {seconds} | "
                     f"{e['status']} |")
    failed = [e for e in report["stages"] if e["status"] in ("failed", "interrupted")]
    if failed:
        lines += ["", f"{failed[0]['name']} {failed[0]['status']}: {failed[0].get('error', '')}", "",
                  f"Resume: `{report['resume']}`"]
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> None:
    """report.json and report.md, each replaced whole."""
    _atomic_write(out / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    _atomic_write(out / REPORT_MD, render_markdown(report))


# ---------------------------------------------------------------- running


def _resume_command(args, out: Path, index: int) -> str:
    words = ["sparseforge", "run", args.recipe, "--output", str(out)]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join(words + ["--from-stage", str(index)])


def _comparable(argv: list[str]) -> list[str]:
    return [word for word in argv if word != "--overwrite"]


def _check_resume(out: Path, stages: list[Stage], from_stage: int) -> dict:
    """The report of the run being resumed; its finished stages must be these stages, with their outputs in place."""
    if from_stage > len(stages):
        raise RecipeError(f"--from-stage {from_stage}: the recipe has {len(stages)} stages: give 1 to {len(stages)}")
    path = out / REPORT_JSON
    if not path.is_file():
        raise RecipeError(f"--from-stage {from_stage}: {path} not found: --output must be the directory of an earlier "
                          "run of this recipe (or drop --from-stage)")
    try:
        previous = json.loads(path.read_text())
        entries = {e["index"]: e for e in previous["stages"]}
    except (ValueError, KeyError, TypeError):
        raise RecipeError(f"{path} is damaged: run the recipe again without --from-stage (with --overwrite)") from None
    for stage in stages[:from_stage - 1]:
        entry = entries.get(stage.index)
        if entry is None or entry.get("status") != "done":
            raise RecipeError(f"--from-stage {from_stage}: {stage.label} did not finish in {out}: resume from "
                              f"--from-stage {stage.index}")
        if _comparable(entry.get("argv", [])) != _comparable(stage.argv):
            raise RecipeError(f"--from-stage {from_stage}: {stage.label}'s settings differ from the run that made its "
                              f"output in {out}: resume from --from-stage {stage.index} (or give the same --set options)")
        for made in (stage.output, stage.json):
            if made is not None and not made.exists():
                raise RecipeError(f"--from-stage {from_stage}: {stage.label}'s output {made} is missing: resume from "
                                  f"--from-stage {stage.index}")
    return previous


def _remove_previous_run(out: Path) -> None:
    """--overwrite: remove what an earlier run of a recipe wrote here (its stage outputs and report), nothing else."""
    mine = re.compile(r"^\d{2}-(" + "|".join(map(re.escape, STAGE_KINDS)) + r")(\.json|\.checkpoints)?$")
    for entry in out.iterdir():
        if entry.name in (REPORT_JSON, REPORT_MD) or mine.match(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _entry(stage: Stage) -> dict:
    return {"index": stage.index, "name": stage.name, "kind": stage.kind, "did": describe(stage), "argv": stage.argv,
            "model": stage.model, "output": str(stage.output) if stage.output else None,
            "json": str(stage.json) if stage.json else None, "status": "pending", "seconds": None, "result": None}


def run_recipe(args) -> int:
    """``sparseforge run``: check every stage, then run them in order, the report rewritten after each."""
    from .cli import COMMANDS, Terminated
    from .export import check_output

    recipe = load_recipe(args.recipe, args.overrides)
    output = args.output or recipe.output
    if not output:
        raise RecipeError(f"recipe {args.recipe} names no output directory: pass --output DIR or add 'output: DIR'")
    out = Path(output)
    from_stage = args.from_stage or 1
    stages = plan(recipe, out, overwrite=args.overwrite, from_stage=from_stage)
    previous = None
    if args.from_stage:
        previous = _check_resume(out, stages, from_stage)
    else:
        try:
            check_output(out, args.overwrite, inputs=[recipe.model])
        except ConfigError as e:
            if (out / REPORT_JSON).is_file():  # an earlier run of a recipe: it may be this one, to resume
                raise RecipeError(f"{e}, or --from-stage N to resume its run") from None
            raise
    check(recipe, stages, from_stage)
    if args.check:
        for stage in stages:
            print(f"{stage.label}: sparseforge {shlex.join(stage.argv)}")
        print(f"all {len(stages)} stages check out; outputs would go to {out}")
        return 0

    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite and not args.from_stage:
        _remove_previous_run(out)
    report = {"recipe": str(args.recipe), "overrides": list(args.overrides), "output": str(out),
              "model": recipe.model, "stages": [_entry(s) for s in stages], "status": "running", "resume": None}
    if previous:
        old = {e["index"]: e for e in previous["stages"]}
        for entry in report["stages"][:from_stage - 1]:
            entry.update({k: old[entry["index"]].get(k) for k in ("status", "seconds", "result")}, reused=True)
    write_report(out, report)
    for stage, entry in zip(stages, report["stages"]):
        if stage.index < from_stage:
            continue
        print(f"== {stage.label} of {len(stages)}: {entry['did']}", flush=True)
        entry["status"] = "running"
        write_report(out, report)
        started = time.perf_counter()
        stage_args = build_raising_parser().parse_args(stage.argv)
        try:
            code = COMMANDS[stage.kind](stage_args)
            if code != 0:
                raise SparseforgeError(f"the {stage.kind} command ended with status {code}")
        except BaseException as e:
            interrupted = isinstance(e, KeyboardInterrupt)
            entry.update(status="interrupted" if interrupted else "failed", seconds=round(time.perf_counter() - started, 3),
                         error=("terminated" if isinstance(e, Terminated) else "interrupted") if interrupted
                         else " ".join(str(e).split()) or type(e).__name__)
            report.update(status="failed", resume=_resume_command(args, out, stage.index))
            write_report(out, report)
            kept = f"the finished stages' outputs and {out / REPORT_MD} are kept; resume with: {report['resume']}"
            if interrupted:
                print(f"sparseforge: {stage.label} {entry['error']}; {kept}", file=sys.stderr)
                return 143 if isinstance(e, Terminated) else 130
            if isinstance(e, SparseforgeError):
                raise SparseforgeError(f"{stage.label}: {entry['error']}; {kept}") from None
            print(f"sparseforge: {stage.label} failed; {kept}", file=sys.stderr)
            raise
        entry.update(status="done", seconds=round(time.perf_counter() - started, 3), result=_result(stage))
        write_report(out, report)
    report["status"] = "done"
    write_report(out, report)
    print(render_markdown(report), end="")
    print(f"report: {out / REPORT_MD} and {out / REPORT_JSON}")
    return 0


def _result(stage: Stage) -> dict | None:
    if stage.json is not None and stage.json.is_file():
        return json.loads(stage.json.read_text())
    if stage.kind == "export":
        from .export import read_metadata

        return {"format": (read_metadata(stage.output).get("save_format") or {}).get("format", stage.args.format)}
    return None
