"""All six analyses of one checkpoint (and optionally a softmax one to compare with) on one image set: PNG figures
and ``analysis.json`` with the numbers behind them, written into one folder."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import attention, functions, landscape, path as opt_path, spectral, weights
from .images import ImageSet
from .load import LoadedModel

_logger = logging.getLogger(__name__)

FAMILIES = ("functions", "attention", "spectra", "weights", "landscape", "path")
FIGURES = {"functions": "1_functions{suffix}.png", "attention": "2_attention_maps.png",
           "rollout": "2_attention_rollout.png", "spectra": "3_spectra.png", "weights": "4_weights.png",
           "landscape": "5_loss_landscape.png", "path": "6_optimizer_path.png"}
JSON_NAME = "analysis.json"


@dataclass
class Settings:
    """What to compute and how much: the landscape's cost is ``(points + grid**2) * batches`` forward passes per
    model, the optimizer path's ``grid**2 * batches``."""

    families: tuple = FAMILIES
    num_images: int = 64  # images for functions, attention and spectra
    image_index: int = 0  # the image of the attention figures
    points: int = 11  # 1-D landscape
    grid: int = 7  # 2-D landscape and path plane, per axis
    span: float = 1.0  # landscape range in units of the filter-normalised direction
    batches: int = 2
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    blocks: Optional[tuple] = None  # blocks drawn in the functions and attention-map figures (None: all)


def _names(models: List[LoadedModel]) -> List[str]:
    names = [m.label for m in models]
    if len(set(names)) < len(names):
        names = [f"{m.label} ({Path(m.path).parent.name}/{Path(m.path).name})" for m in models]
    return names


def _check_inputs(models: Dict[str, LoadedModel], data: ImageSet) -> None:
    for name, m in models.items():
        proj = m.model.patch_embed
        want = (proj.proj.in_channels, *proj.img_size)
        if tuple(data.images.shape[1:]) != want:
            raise ValueError(f"{name} ({m.path}) takes inputs of shape {want} but the images are "
                             f"{tuple(data.images.shape[1:])}: KArAt models are tied to their token count, so "
                             f"--compare must be a model of the same input size and channels.")


def analyze(primary: LoadedModel, data: ImageSet, out_dir: Path, compare: Optional[LoadedModel] = None,
            settings: Settings = Settings()) -> Dict[str, Any]:
    """Run the chosen families; returns (and writes) the JSON summary."""
    loaded = [primary] + ([compare] if compare is not None else [])
    models = dict(zip(_names(loaded), loaded))
    _check_inputs(models, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = data.images[: settings.num_images]
    result: Dict[str, Any] = dict(models={n: m.describe() for n, m in models.items()},
                                  images=dict(source=data.source, count=len(data.images), used=len(images),
                                              labelled=data.labels is not None),
                                  settings=settings.__dict__, figures={}, seconds={}, cpu_seconds={}, skipped={})

    def timed(family: str, fn) -> None:
        if family not in settings.families:
            return
        start, cpu = time.time(), time.process_time()
        try:
            fn()
        finally:
            result["seconds"][family] = round(time.time() - start, 2)
            result["cpu_seconds"][family] = round(time.process_time() - cpu, 2)
            _logger.info("%s: %.1f s (%.1f s of CPU)", family, result["seconds"][family],
                         result["cpu_seconds"][family])

    def do_functions() -> None:
        karat_models = {n: m for n, m in models.items() if m.is_karat}
        if not karat_models:
            result["skipped"]["functions"] = "no KArAt model: softmax has no learned functions"
            return
        result["functions"] = {}
        for i, (name, m) in enumerate(karat_models.items()):
            rows = functions.summarise_functions(m.model, images)
            fig = FIGURES["functions"].format(suffix="" if i == 0 else f"_{i}")
            shown = [r for r in rows if settings.blocks is None or r["block"] in settings.blocks]
            functions.plot_functions(shown, str(out_dir / fig), title=f"{name}: learned univariate functions "
                                     f"over the inputs {len(images)} images produce")
            result["functions"][name] = rows
            result["figures"].setdefault("functions", []).append(fig)

    records: Dict[str, attention.AttentionRecord] = {}

    def get_records() -> Dict[str, attention.AttentionRecord]:
        if not records:
            records.update({n: attention.record_attention(m.model, images) for n, m in models.items()})
        return records

    def do_attention() -> None:
        recs = get_records()
        one = {n: attention.AttentionRecord([a[settings.image_index:settings.image_index + 1] for a in r.maps],
                                            [], r.karat_heads) for n, r in recs.items()}
        attention.plot_attention_grid(one, str(out_dir / FIGURES["attention"]), blocks=settings.blocks)
        grid = tuple(primary.model.patch_embed.grid_size)
        rollout = attention.plot_rollout(one, data.images[settings.image_index], grid,
                                         {n: m.model.num_prefix_tokens for n, m in models.items()},
                                         str(out_dir / FIGURES["rollout"]))
        result["attention"] = dict(
            image_index=settings.image_index, rollout=rollout,
            # whole matrices for small token counts; otherwise what each key receives (mean over queries)
            maps={n: [(a[settings.image_index] if a.shape[-1] <= 64 else a[settings.image_index].mean(-2)).tolist()
                      for a in r.maps] for n, r in recs.items()},
            karat_heads={n: r.karat_heads for n, r in recs.items()})
        result["figures"]["attention"] = [FIGURES["attention"], FIGURES["rollout"]]

    def do_spectra() -> None:
        summary = {n: spectral.spectral_summary(r.maps, r.karat_heads) for n, r in get_records().items()}
        spectral.plot_spectra(summary, str(out_dir / FIGURES["spectra"]))
        result["spectra"] = summary
        result["figures"]["spectra"] = [FIGURES["spectra"]]

    def do_weights() -> None:
        named = {n: m.model for n, m in models.items()}
        weights.plot_weights(named, str(out_dir / FIGURES["weights"]))
        result["weights"] = weights.weight_summary(named)
        result["figures"]["weights"] = [FIGURES["weights"]]

    def batches_for(m: LoadedModel):
        if data.labels is not None:
            return data.batches(settings.batch_size, settings.batches), "the images' labels"
        x = data.images[: settings.batch_size * settings.batches]
        with torch.no_grad():
            y = torch.cat([m.model(x[i:i + settings.batch_size]).argmax(-1) for i in range(0, len(x),
                                                                                           settings.batch_size)])
        return ImageSet(x, y, data.source).batches(settings.batch_size, settings.batches), \
            "the checkpoint's own predictions (the images have no labels)"

    def do_landscape() -> None:
        heads = {n: m for n, m in models.items() if m.has_head}
        if not heads:
            result["skipped"]["landscape"] = "backbone checkpoints have no classifier, so no loss"
            return
        res = {}
        for name, m in heads.items():
            batches, targets = batches_for(m)
            gen = torch.Generator().manual_seed(settings.seed)
            d1 = landscape.filter_normalised_direction(m.model, gen)
            d2 = landscape.filter_normalised_direction(m.model, gen)
            alphas = landscape.symmetric_grid(settings.points, settings.span)
            xs = landscape.symmetric_grid(settings.grid, settings.span)
            centre = landscape.mean_loss(m.model, batches)
            res[name] = dict(alphas=alphas, loss_1d=landscape.landscape_1d(
                m.model, batches, d1, alphas, desc=f"{name} 1-D landscape", progress=settings.progress),
                xs=xs, ys=xs, loss_2d=landscape.landscape_2d(m.model, batches, d1, d2, xs, xs,
                                                             desc=f"{name} 2-D landscape", progress=settings.progress),
                centre_loss=centre, targets=targets, images=sum(len(y) for _, y in batches))
        landscape.plot_landscapes(res, str(out_dir / FIGURES["landscape"]))
        result["landscape"] = res
        result["figures"]["landscape"] = [FIGURES["landscape"]]

    def do_path() -> None:
        res, why = {}, []
        for name, m in models.items():
            files = opt_path.find_trajectory(Path(m.path)) if m.has_head else []
            if len(files) < 2:
                why.append(f"{name}: {len(files)} checkpoint-epochNNN.pth beside {m.path} (train with "
                           f"classification.main --keep-every K to keep them)" if m.has_head else
                           f"{name}: a backbone has no classifier, so no loss")
                continue
            states = opt_path.load_states(files, m.model)
            plane = opt_path.trajectory_plane(m.model, states)
            coords = plane["coords"]
            xs = opt_path.axis_range([c[0] for c in coords], settings.grid)
            ys = opt_path.axis_range([c[1] for c in coords], settings.grid)
            batches, targets = batches_for(m)
            loss = landscape.landscape_2d(m.model, batches, plane["d1"], plane["d2"], xs, ys,
                                          desc=f"{name} path plane", progress=settings.progress)
            epochs = [int(opt_path.EPOCH_FILE.search(f.name).group(1)) for f in files]
            res[name] = dict(checkpoints=[str(f) for f in files], epochs=epochs, coords=coords,
                             explained=plane["explained"], xs=xs, ys=ys, loss=loss, targets=targets)
        if res:
            opt_path.plot_paths(res, str(out_dir / FIGURES["path"]))
            result["path"] = res
            result["figures"]["path"] = [FIGURES["path"]]
        if why:
            result["skipped"]["path"] = "; ".join(why)

    for family, fn in (("functions", do_functions), ("attention", do_attention), ("spectra", do_spectra),
                       ("weights", do_weights), ("landscape", do_landscape), ("path", do_path)):
        timed(family, fn)
    (out_dir / JSON_NAME).write_text(json.dumps(result, indent=1, default=float))
    return result
