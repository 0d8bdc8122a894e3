"""Every command of the READMEs' ```bash (and ```python) blocks is run, so the documentation cannot drift.

Each command gets exactly one entry in PLAN, matched by a substring of the command:

* ``run``: as written, in a scratch folder that links the repository's code (nothing is written into the repo);
* ``shorten``: as written plus documented override flags appended (``--quick``, ``train.max_iter=2``, ...);
* ``dry``: needs GPUs, a download or a real dataset: ``tests/readme_dryrun.py`` runs the program up to its argparse
  parse and checks the configs and overrides it names (a wrong flag, path or override fails);
* ``skip``: not runnable here at all, with the reason.

A command without an entry fails the test (a new README command needs a plan), and so does an entry no command uses.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import require

ROOT = Path(__file__).resolve().parents[1]
READMES = ("README.md", "detectron2_plugin/README.md", "mmseg_configs/README.md", "benchmarks/README.md")
LINKED = ("karat", "classification", "detectron2_plugin", "mmseg_configs", "configs", "tools", "main.py", "tests")
SHAPES = "--num-train 8 --num-val 4"  # python -m detectron2_plugin.data's own flags
D2_SHORT = ("train.max_iter=2 train.eval_period=2 train.checkpointer.period=3 train.log_period=1 "
            "dataloader.train.total_batch_size=2")
MMSEG_SHORT = ("--cfg-options train_cfg.max_iters=2 train_cfg.val_interval=2 default_hooks.checkpoint.interval=2 "
               "default_hooks.logger.interval=1 train_dataloader.batch_size=4 "
               "param_scheduler.0.end=1 param_scheduler.1.begin=1 param_scheduler.1.end=2")
BENCH_ATTENTION = "--tokens 17 --batch 1 --repeat 1 --rounds 1 --warmup 0 --impl softmax efficient"
BENCH_MODEL = "--batch 1 --repeat 1 --rounds 1 --warmup 0 --impl efficient"
DIGITS = "--epochs 1 --train-limit 64"  # tools/demo.py's own flags
# Commands that more than one README runs to the same effect: the first run's output is reused (linked).
SHARED = {"tools/demo.py --no-transfer --output-dir outputs/digits": "outputs/digits"}


@dataclass(frozen=True)
class Plan:
    action: str  # run | shorten | dry | skip
    reason: str
    extra: str = ""  # appended to the command (shorten)


PLAN: Dict[str, Plan] = {
    # README.md
    "make demo": Plan("skip", "make demo itself: builds the environment and runs 10 minutes; tools/demo.py is tested "
                              "by tests/test_demo.py, its stages below and by their own tests"),
    "make test": Plan("skip", "the test suite itself"),
    "torch.onnx.export(model, (x,), \"vit_karat.onnx\"": Plan(
        "skip", "exports a full ViT-Tiny (minutes on two cores); tests/test_onnx_export.py makes the same calls on "
        "tiny models of every family and host"),
    "\"vit_karat_any_size.onnx\"": Plan(
        "skip", "exports a full ViT-Tiny with dynamic spatial axes (about a minute on two cores); "
        "tests/test_onnx_export.py makes the same call on a small ViT and runs the graph at four sizes"),
    "tools/onnx_benchmark.py --batch 8": Plan("skip", "the ONNX benchmark itself (minutes)"),
    "pytorch-image-models/train.py --device-modules karat": Plan(
        "skip", "timm's scripts live in timm's repository, not in its wheel; tests/test_timm_script.py runs the route"),
    "karat.timm_script PATH/TO/pytorch-image-models/validate.py": Plan(
        "skip", "timm's scripts live in timm's repository, not in its wheel; tests/test_timm_script.py runs the route"),
    "karat.timm_script PATH/TO/pytorch-image-models/onnx_export.py": Plan(
        "skip", "timm's scripts live in timm's repository, not in its wheel; tests/test_timm_script.py runs the route"),
    "torchrun --nproc_per_node=8 --max-restarts=3 main.py": Plan(
        "dry", "8 GPUs and ImageNet; tests/test_torchrun_restart.py runs this recipe on 2 CPU workers and "
                "kills one"),
    "torchrun --nproc_per_node=8 main.py": Plan("dry", "8 GPUs and ImageNet; tests/test_classification.py runs the "
                                                       "same flags with python main.py on a generated ImageNet tree"),
    "convert_to_detectron2.py runs/vit_b_karat": Plan("dry", "needs a ViT-B classifier trained on ImageNet"),
    "lazyconfig_train.py --config-file configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py \\": Plan(
        "dry", "8 GPUs and COCO"),
    "MMSEG=$(python -c": Plan("run", "cheap: finds mmseg's own tools"),
    "convert_to_mmseg.py runs/vit_s_karat": Plan("dry", "needs a ViT-S classifier trained on ImageNet"),
    "dist_train.sh": Plan("dry", "8 GPUs and ADE20K"),
    "dist_test.sh": Plan("dry", "8 GPUs, ADE20K and a trained model"),
    # detectron2_plugin/README.md
    "convert_to_detectron2.py output/vit_base_karat": Plan("dry", "needs a ViT-B classifier trained on ImageNet"),
    "convert_to_detectron2.py timm:": Plan("dry", "downloads timm's weights from the Hugging Face hub"),
    "CFG=configs/COCO/": Plan("run", "a variable"),
    "lazyconfig_train.py --config-file $CFG": Plan("dry", "GPUs and COCO"),
    "/path/to/detectron2/tools/lazyconfig_train_net.py": Plan(
        "skip", "needs a detectron2 source checkout (the installed package has no tools/); the same arguments are "
                "dry-run with tools/lazyconfig_train.py above"),
    "tools/demo.py --no-transfer --output-dir outputs/digits": Plan("shorten", "the digits classifiers, 1 epoch",
                                                                     DIGITS),
    "python -m detectron2_plugin.data --output": Plan("shorten", "fewer images", SHAPES),
    "convert_to_detectron2.py outputs/digits/": Plan("run", "CPU, a few seconds"),
    "lazyconfig_train.py --config-file configs/shapes/": Plan("shorten", "2 iterations", D2_SHORT),
    "from detectron2_plugin import add_karat_config": Plan("run", "the yacs snippet, CPU fallback included"),
    # mmseg_configs/README.md
    "custom_imports = dict(": Plan("run", "a config fragment"),
    "export PYTHONPATH=": Plan("run", "a variable"),
    "CFG=mmseg_configs/upernet/": Plan("run", "a variable"),
    "$MMSEG/tools/train.py $CFG": Plan("dry", "a GPU and ADE20K"),
    "$MMSEG/tools/test.py $CFG": Plan("dry", "a GPU, ADE20K and a trained model"),
    "convert_to_mmseg.py output/vit_s_karat": Plan("dry", "needs a ViT-S classifier trained on ImageNet"),
    "convert_to_mmseg.py timm:": Plan("dry", "downloads timm's weights from the Hugging Face hub"),
    "python -m mmseg_configs.data data/karat_embedded": Plan("shorten", "fewer images", "8 4"),
    "$MMSEG/tools/train.py mmseg_configs/upernet/upernet_vit-t2-karat": Plan("shorten", "2 iterations", MMSEG_SHORT),
    "python -m mmseg_configs.demo outputs/seg": Plan("shorten", "2 iterations per backbone", "--quick"),
    # README.md (Usage)
    "pip download --no-deps --no-binary :all: \"timm==": Plan(
        "skip", "downloads timm's sdist; tests/test_timm_suite.py runs these three commands (with a cache)"),
    "tar xzf /tmp/timm/timm-": Plan("skip", "unpacks the download above (tests/test_timm_suite.py)"),
    "python -m pytest tests/test_models.py -p karat": Plan("skip", "timm's own suite: tests/test_timm_suite.py"),
    "timm.create_model(\n    \"vit_tiny_patch16_224_karat\"": Plan("run", "builds a ViT-Tiny"),
    # benchmarks/README.md
    "benchmark.py --level attention --tokens 197 1025 --model tiny": Plan("shorten", "17 tokens, two impls",
                                                                           BENCH_ATTENTION),
    "benchmark.py --level model --model tiny --batch 8": Plan("shorten", "one step, one impl", BENCH_MODEL),
    "benchmark.py --device cuda": Plan("dry", "a GPU"),
    "--tokens 17 26 37 50 65": Plan("shorten", "17 tokens, one round", BENCH_ATTENTION),
    "python -m tools.host_ops --paths softmax fused efficient": Plan("shorten", "20 steps", "--repeat 20"),
    "--repeat 2 --rounds 1 --profile 8": Plan("shorten", "17 tokens, one round, with its profile tables",
                                              BENCH_ATTENTION),
    "tools.kernel_table --out benchmarks/gpu_kernel_table": Plan(
        "shorten", "the tool's registry and writing on a module without variants; tests/test_fused_compile.py runs "
        "the compiles", "--archs 90 --modules karat.kernels.offline"),
    "tools.kernel_table --space": Plan("shorten", "as above", "--archs 90 --modules karat.kernels.offline"),
}


# ------------------------------------------------------------------------------------------------------------
def _strip_comment(line: str) -> str:
    """``line`` without a trailing shell comment (a ``#`` outside quotes, at the start or after a blank)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def blocks(readme: str) -> List[Tuple[str, str]]:
    """(language, text) of every ```bash and ```python block of ``readme``."""
    text = (ROOT / readme).read_text()
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M)]


def commands(readme: str) -> List[Tuple[str, str]]:
    """(language, command) in order: bash lines with their continuations joined and comments dropped; a python
    block is one command."""
    out: List[Tuple[str, str]] = []
    for lang, body in blocks(readme):
        if lang == "python":
            out.append((lang, body))
            continue
        pending = ""
        for raw in body.splitlines():
            line = _strip_comment(raw)
            if not line.strip():
                continue
            if line.endswith("\\"):
                pending += line + "\n"
                continue
            out.append((lang, pending + line))
            pending = ""
    return out


def plan_of(command: str) -> str:
    keys = [k for k in PLAN if k in command]
    assert len(keys) == 1, f"README command matches {len(keys)} PLAN entries {keys} (need exactly 1):\n{command}"
    return keys[0]


def all_commands() -> List[Tuple[str, str, str]]:
    return [(readme, lang, cmd) for readme in READMES for lang, cmd in commands(readme)]


def test_every_readme_command_has_one_plan_and_no_plan_is_stale():
    used = {plan_of(cmd) for _, _, cmd in all_commands()}
    assert sorted(set(PLAN) - used) == [], "stale PLAN entries: no README command matches them"
    for key, plan in PLAN.items():
        assert plan.action in ("run", "shorten", "dry", "skip") and plan.reason, key
        assert (plan.action == "shorten") == bool(plan.extra), key


def test_repository_paths_in_readme_commands_exist():
    """Scripts, configs and modules a command names exist (cheap, and it covers the skipped commands too)."""
    pattern = re.compile(r"(?<![\w/.$-])((?:tools|configs|mmseg_configs|detectron2_plugin|classification)/[\w./-]+\.py"
                         r"|main\.py)\b")
    missing = []
    for readme, _, cmd in all_commands():
        for path in pattern.findall(cmd):
            if not (ROOT / path).is_file():
                missing.append(f"{readme}: {path}")
        for module in re.findall(r"python -m ([\w.]+)", cmd):
            if module.split(".")[0] in LINKED and not (
                    (ROOT / module.replace(".", "/")).with_suffix(".py").is_file()
                    or (ROOT / module.replace(".", "/") / "__main__.py").is_file()):
                missing.append(f"{readme}: python -m {module}")
    assert missing == []


def _script(readme: str, dry_list: Path, cache: Path) -> str:
    """The README's commands as one bash script (in README order: later commands use earlier outputs)."""
    lines = ["set -eo pipefail"]
    for lang, cmd in commands(readme):
        plan = PLAN[plan_of(cmd)]
        shown = cmd.replace("\n", " ")
        if plan.action == "skip":
            lines.append(f"echo {shlex.quote('# skipped (' + plan.reason + '): ' + shown)}")
            continue
        if lang == "python":
            lines.append(f"echo {shlex.quote('+ python block: ' + shown[:80])}")
            lines.append(f"python -c {shlex.quote(cmd)}")
            continue
        if plan.action == "dry":  # bash expands the variables, readme_dryrun.py checks the expanded line later
            lines.append(f"printf '%q ' {cmd.replace(chr(92) + chr(10), ' ')} >> {dry_list}; echo >> {dry_list}")
            continue
        full = cmd + (" " + plan.extra if plan.extra else "")
        lines.append(f"echo \"[$SECONDS s]\" {shlex.quote('+ ' + full.replace(chr(10), ' '))}")
        shared = next((out for key, out in SHARED.items() if key in cmd), None)
        if shared:
            kept = cache / shared.replace("/", "_")
            lines.append(f"if [ -d {kept} ]; then mkdir -p {Path(shared).parent} && ln -s {kept} {shared}; "
                         f"echo '(output of an earlier README run reused)'; else {full} && cp -r {shared} {kept}; fi")
        else:
            lines.append(full)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme_shared")


@pytest.mark.slow
@pytest.mark.parametrize("readme", READMES)
def test_readme_commands_run(readme, tmp_path, cache):
    require("detectron2")
    require("mmseg")
    work = tmp_path / "work"
    work.mkdir()
    for name in LINKED:  # the code, linked; whatever the commands write stays in tmp_path
        (work / name).symlink_to(ROOT / name)
    (work / "benchmarks").mkdir()  # results of the benchmark commands go here (the repo's files stay untouched)
    dry_list = tmp_path / "dry.txt"
    dry_list.touch()
    script = tmp_path / "readme.sh"
    script.write_text(_script(readme, dry_list, cache))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(work), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               RANK="0", MASTER_ADDR="127.0.0.1")
    env.pop("DETECTRON2_DATASETS", None)
    proc = subprocess.run(["bash", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{readme}: a command failed\n{log[-6000:]}"
    print(proc.stdout)
    if dry_list.read_text().strip():
        proc = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_dryrun.py"), str(dry_list)], cwd=work,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{readme}: a dry run failed\n{(proc.stdout + proc.stderr)[-6000:]}"
        assert proc.stdout.count("dry-run ok") == len(dry_list.read_text().splitlines())
