"""Dry run of README commands that need GPUs, downloads or real datasets (used by test_readme_commands.py).

``python tests/readme_dryrun.py LIST`` reads one shell-quoted command per line of LIST (already expanded by bash),
and for each: finds the Python program it starts (``python script``, ``python -m module``, ``torchrun ...``,
mmseg's ``dist_train.sh`` / ``dist_test.sh``), runs it in this process only as far as its argparse parse
(a parse error fails), then checks what the parsed arguments name: a detectron2 lazy config loads and takes its
``key=value`` overrides, an mmengine config loads and takes ``--cfg-options``. Nothing trains or downloads.
"""
from __future__ import annotations

import argparse
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any, List, Tuple


class Parsed(Exception):
    """Raised right after a program's argparse parse: the dry run stops there."""

    def __init__(self, namespace: Any) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def _stop_after(name: str) -> None:
    original = getattr(argparse.ArgumentParser, name)

    def wrapper(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise Parsed(original(self, *args, **kwargs))

    setattr(argparse.ArgumentParser, name, wrapper)


def program(argv: List[str]) -> Tuple[str, str, List[str]]:
    """(kind 'script' or 'module', target, arguments) of a command line."""
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        argv = argv[1:]  # VAR=value prefixes
    prog, rest = Path(argv[0]).name, argv[1:]
    if prog == "bash":
        script = Path(rest[0])
        if not script.is_file():
            raise SystemExit(f"{script} does not exist")
        n = {"dist_train.sh": 2, "dist_test.sh": 3}.get(script.name)
        if n is None:
            raise SystemExit(f"no dry run for {script}")
        # the scripts run `<train|test>.py CONFIG [CHECKPOINT] --launcher pytorch ${@:n+1}` under torch.distributed
        py = script.with_name(script.name.replace("dist_", "").replace(".sh", ".py"))
        return "script", str(py), rest[1:n] + rest[n + 1:] + ["--launcher", "pytorch"]
    if prog == "torchrun":
        while rest and rest[0].startswith("--"):
            rest = rest[1:]
    elif prog.startswith("python"):
        pass
    else:
        raise SystemExit(f"no dry run for {prog}")
    if rest[0] == "-m":
        return "module", rest[1], rest[2:]
    return "script", rest[0], rest[1:]


def check(namespace: Any) -> str:
    """Check what the parsed arguments name (configs and their overrides); returns what was checked."""
    done = []
    config_file = getattr(namespace, "config_file", None)
    if config_file:
        from detectron2.config import LazyConfig

        cfg = LazyConfig.load(config_file)
        LazyConfig.apply_overrides(cfg, list(getattr(namespace, "opts", None) or []))
        done.append(f"lazy config {config_file} + {len(namespace.opts or [])} overrides")
    config = getattr(namespace, "config", None)
    if isinstance(config, str) and config.endswith(".py"):
        from mmengine.config import Config

        cfg = Config.fromfile(config)
        if getattr(namespace, "cfg_options", None):
            cfg.merge_from_dict(namespace.cfg_options)
        done.append(f"mmengine config {config}")
    return ", ".join(done) or "arguments"


def dry_run(argv: List[str]) -> str:
    kind, target, args = program(argv)
    if kind == "script" and not Path(target).is_file():
        raise SystemExit(f"{target} does not exist")
    saved, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    if kind == "script":
        sys.path.insert(0, str(Path(target).resolve().parent))  # as `python script` does
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except Parsed as p:
        return check(p.namespace)
    finally:
        sys.argv, sys.path[:] = saved, saved_path
    raise SystemExit(f"{target} ran without parsing arguments with argparse; no dry run possible")


def main() -> int:
    for name in ("parse_args", "parse_intermixed_args"):
        _stop_after(name)
    failures = 0
    for line in Path(sys.argv[1]).read_text().splitlines():
        argv = shlex.split(line)
        try:
            print(f"dry-run ok ({dry_run(argv)}): {line}")
        except SystemExit as e:  # argparse errors and our refusals
            failures += 1
            print(f"dry-run FAILED ({e}): {line}")
        except Exception as e:  # noqa: BLE001 - report every command, then fail
            failures += 1
            print(f"dry-run FAILED ({type(e).__name__}: {e}): {line}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
