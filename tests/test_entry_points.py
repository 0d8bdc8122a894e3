"""The newcomer path: every ``python -m`` / ``tools`` entry point answers ``--help``, and the mistakes a new user
makes (mistyped config, a checkpoint of another size, GPUs that are not there, a reused output folder) get errors
that name the problem and the fix."""
from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import require

ROOT = Path(__file__).resolve().parents[1]


def entry_points() -> list:
    """Every module / script of the repository with an ``if __name__ == "__main__"`` block."""
    found = []
    for path in sorted(ROOT.glob("**/*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", ".venv", "outputs", "build", "dist") or rel.parts[0].startswith("."):
            continue
        if re.search(r"^if __name__ == .__main__.:", path.read_text(), re.M):
            found.append(rel)
    return found


def test_the_entry_point_list_is_complete():
    names = {str(p) for p in entry_points()}
    assert {"mmseg_configs/data.py", "mmseg_configs/demo.py", "detectron2_plugin/data/__main__.py",
            "tools/lazyconfig_train.py", "classification/main.py", "main.py"} <= names


_HELP = r'''
import contextlib, io, runpy, sys
from pathlib import Path
failures = []
for target in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [target, "--help"]
    saved = sys.path[:]
    try:
        with contextlib.redirect_stdout(out):
            if target.endswith(".py"):
                sys.path.insert(0, str(Path(target).resolve().parent))
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        failures.append(f"{target}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage:" not in out.getvalue():
            failures.append(f"{target}: exit {e.code}, output {out.getvalue()[:300]!r}")
    finally:
        sys.path[:] = saved
print("\n".join(failures) or "all ok")
sys.exit(1 if failures else 0)
'''


@pytest.mark.slow
def test_every_entry_point_has_help_and_writes_nothing(tmp_path):
    require("detectron2")
    require("mmseg")
    targets = []
    for rel in entry_points():
        if rel.parts[0] == "tools" or rel == Path("main.py"):
            targets.append(str(ROOT / rel))  # as `python tools/NAME.py` runs it
        if rel.parts[0] == "tools":
            targets.append(f"tools.{rel.stem}")  # as `python -m tools.NAME` runs it
        elif rel != Path("main.py"):
            module = ".".join(rel.with_suffix("").parts)
            targets.append(module[: -len(".__main__")] if module.endswith(".__main__") else module)
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _HELP, *targets], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # --help is not a folder name (it once wrote 40 images into --help/)


def console_scripts() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_console_scripts_name_callables_of_packaged_modules():
    """Every ``[project.scripts]`` target is a function of a module in a packaged folder (without importing the hosts:
    the module's source defines it), and each tool with a ``main`` is reachable as a console script."""
    scripts = console_scripts()
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {"karat-train", "karat-convert-d2", "karat-convert-mmseg", "karat-bench", "karat-flops", "karat-demo",
            "karat-analyze"} <= set(scripts)
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert any(fnmatch.fnmatch(module.split(".")[0], pattern) for pattern in packages["include"]), name
        spec = importlib.util.find_spec(module)
        assert spec is not None and Path(spec.origin).is_relative_to(ROOT), f"{name}: {module} is not in {ROOT}"
        tree = ast.parse(Path(spec.origin).read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert func in defined, f"{name}: {module} has no {func}()"
    assert (ROOT / "tools" / "__init__.py").is_file()  # so that `tools*` is a package the wheel carries


def test_console_scripts_run_in_process(capsys):
    """The console scripts that need no host framework, called as the installed wrapper calls them."""
    for name in ("karat-train", "karat-flops", "karat-bench", "karat-analyze"):
        module, _, func = console_scripts()[name].partition(":")
        main = getattr(importlib.import_module(module), func)
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0 and "usage:" in capsys.readouterr().out, name


def test_demo_default_output_is_under_the_working_folder(tmp_path, monkeypatch):
    """``karat-demo`` from an installed package writes beside the user, never into site-packages."""
    from tools.demo import new_output_dir

    monkeypatch.chdir(tmp_path)
    first, second = new_output_dir(None), new_output_dir(None)
    assert first.parent == second.parent == Path("outputs") and first != second
    assert (tmp_path / first).is_dir() and (tmp_path / second).is_dir()


# ------------------------------------------------------------------------------------------------------------
def test_mmseg_data_cli_and_layout_error_name_the_command(tmp_path, capsys):
    from mmseg_configs import data

    assert data.main([str(tmp_path / "d"), "2", "1"]) == 0
    assert "ADEChallengeData2016" in capsys.readouterr().out
    assert len(list((tmp_path / "d" / "ADEChallengeData2016" / "images" / "training").glob("*.jpg"))) == 2
    with pytest.raises(ValueError, match=r"python -m mmseg_configs\.data data/karat_embedded"):
        data.check_ade20k_layout(tmp_path / "nowhere")
    with pytest.raises(SystemExit):
        data.main([str(tmp_path / "e"), "0"])


def test_mmseg_demo_refuses_a_used_folder_and_missing_checkpoints(tmp_path, capsys):
    require("mmseg")
    from mmseg_configs import demo

    used = tmp_path / "used"
    used.mkdir()
    (used / "mine.txt").write_text("keep")
    assert demo.main([str(used), "--from-demo", str(tmp_path / "nodemo")]) == 2
    assert "not empty" in capsys.readouterr().err and (used / "mine.txt").read_text() == "keep"
    assert demo.main([str(tmp_path / "new"), "--from-demo", str(tmp_path / "nodemo")]) == 2
    err = capsys.readouterr().err
    assert "classification/karat/checkpoint.pth" in err and "tools/demo.py --no-transfer" in err
    with pytest.raises(SystemExit):
        demo.main([str(tmp_path / "new"), "other=x.pth"])


def test_yacs_route_falls_back_to_the_cpu(caplog):
    require("detectron2")
    if torch.cuda.is_available():
        pytest.skip("the fallback applies without CUDA")
    from detectron2.config import get_cfg

    from detectron2_plugin import add_karat_config

    cfg = get_cfg()
    assert cfg.MODEL.DEVICE == "cuda"  # detectron2's default, which fails without an NVIDIA driver
    add_karat_config(cfg)
    assert cfg.MODEL.DEVICE == "cpu" and "CUDA is not available" in caplog.text
    cfg.MODEL.DEVICE = "meta"
    add_karat_config(cfg)
    assert cfg.MODEL.DEVICE == "meta"  # an explicit non-CUDA device is left alone


def _lazyconfig(argv):
    from tools import lazyconfig_train

    return lazyconfig_train.invoke_main(argv)


def test_launcher_refuses_missing_gpus_and_names_close_configs(capsys):
    require("detectron2")
    with pytest.raises(SystemExit):
        _lazyconfig(["--config-file", "configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_10ep.py"])
    err = capsys.readouterr().err
    assert "does not exist" in err and "configs/COCO/mask_rcnn_vitdet_karat_b_blockwise_100ep.py" in err
    if torch.cuda.device_count() < 2:
        with pytest.raises(SystemExit):
            _lazyconfig(["--config-file", str(ROOT / "configs/shapes/mask_rcnn_vitdet_t_shapes.py"),
                         "--num-gpus", "2"])
        err = capsys.readouterr().err
        assert "--num-gpus 2" in err and "CUDA GPU" in err and "--num-gpus" in err.split("CUDA GPU")[-1]


def test_converter_names_close_configs(tmp_path, capsys):
    require("detectron2")
    from tools import convert_to_detectron2 as tool

    rc = tool.main(["timm:none", "--config-file", str(ROOT / "configs/shapes/mask_rcnn_vitdet_karat_t_shape.py"),
                    "--output", str(tmp_path / "o.pth")])
    err = capsys.readouterr().err
    assert rc == 2 and "mask_rcnn_vitdet_karat_t_shapes.py" in err and not (tmp_path / "o.pth").exists()


def test_mmseg_fit_names_the_width_not_the_class_token():
    require("mmseg")
    from mmseg_configs.backbones import KArAtVisionTransformer
    from mmseg_configs.convert import fit_vit_state

    small = dict(img_size=(32, 32), patch_size=16, num_layers=2, num_heads=2, mlp_ratio=2, out_indices=(1,),
                 karat_cfg=dict(grid=1, hidden_dim=2))
    source = KArAtVisionTransformer(embed_dims=64, with_cls_token=False, **small).state_dict()
    target = KArAtVisionTransformer(embed_dims=32, **small)
    with pytest.raises(ValueError, match=r"width \(embed_dims\) 64 vs the model's 32") as e:
        fit_vit_state(source, target)
    assert "class token" not in str(e.value)
    deeper = KArAtVisionTransformer(embed_dims=32, **dict(small, num_layers=3)).state_dict()
    with pytest.raises(ValueError, match=r"depth \(num_layers\) 3 vs the model's 2"):
        fit_vit_state(deeper, target)


def test_timm_pretrained_file_of_another_size_names_the_width(tmp_path):
    import timm

    import karat  # noqa: F401

    small = dict(img_size=32, depth=2, num_classes=4, grid=1, hidden_dim=2)
    ckpt = tmp_path / "softmax_small.pth"
    torch.save(timm.create_model("vit_small_patch16_224", img_size=32, depth=2, num_classes=4).state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"width \(embed_dim\) 384 vs the model's 192"):
        timm.create_model("vit_tiny_patch16_224_karat", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(ckpt)), **small)
    deeper = tmp_path / "softmax_tiny_deeper.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=4).state_dict(), deeper)
    with pytest.raises(ValueError, match=r"depth 3 vs the model.s 2"):
        timm.create_model("vit_tiny_patch16_224_karat", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(deeper)), **small)
    same = tmp_path / "softmax_tiny.pth"
    torch.save(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=4).state_dict(), same)
    timm.create_model("vit_tiny_patch16_224_karat", pretrained=True, pretrained_cfg_overlay=dict(file=str(same)),
                      **small)  # the same size still loads
