"""The sweep of ``studies.image_world``: build the world, teachers, references and pools, train every cell, measure.

``execute(cfg)`` returns the metrics dict (``runs``: one row per trained member; ``curves``: E and FD
per member at every budget; ``references``: the teachers' own samples scored the same way;
``summary`` / ``verdicts`` from ``studies.image_world_report``) plus ``_plot`` (arrays for the figures,
dropped from metrics.json).
"""
from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from toys.image_world.metrics import covariance_spectrum, radial_power
from toys.image_world.students import make_students
from toys.image_world.teachers import score_error_per_t
from toys.image_world.training import build_pool, train_students
from toys.image_world.world import build_teacher, build_world

from . import common
from .image_world_eval import (exact_samples, fd_floor, heldout_row, make_eval_set, make_reference, member_metrics,
                               reference_row)

__all__ = ["execute", "pool_seed"]

#: offset of the pool seeds from the run seeds (the pool stream is independent of init and batch order)
POOL_SEED_OFFSET = 100_003


def pool_seed(seed: int) -> int:
    return POOL_SEED_OFFSET + int(seed)


def execute(cfg, progress: bool = True, quick: bool = False) -> dict[str, Any]:
    from .image_world import cells
    from .image_world_report import summarise, switch_effects, verdicts

    start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.device == "cpu":
        common.set_threads(cfg.threads)
    dev = cfg.device
    cache = dict(cache_dir=cfg.cache_dir, use_cache=cfg.use_cache)
    todo, skipped = cells(cfg)

    # 1. world: data, classifier, autoencoder, spaces with their exact teachers
    with common.Timer() as tm:
        world = build_world(cfg.data, cfg.spaces, cfg.grid_size, cfg.classifier, cfg.autoencoder,
                            cfg.guidance is not None, progress=progress, device=dev, **cache)
    timings["world"] = tm.seconds
    t_T = float(world.grid[-1])
    num_classes = world.data.num_classes if cfg.guidance is not None else 0

    # 2. teachers (learned ones cached) and their score error against the exact empirical score
    teachers: dict[tuple[str, str], tuple[Any, Any, dict]] = {}
    score_errors: dict[str, dict] = {}
    t_values = torch.linspace(1.0, t_T, cfg.eval.score_error_times).round().tolist()
    with common.Timer() as tm:
        for sp in cfg.spaces:
            for kind in cfg.teachers:
                teacher, raw, info = build_teacher(world, world.spaces[sp], kind, cfg.teacher, cfg.guidance, device=dev,
                                                   progress=progress, **cache)
                teachers[(sp, kind)] = (teacher, raw, info)
                if kind == "learned":
                    se = score_error_per_t(raw, world.spaces[sp].exact, world.spaces[sp].train.to(dev), t_values,
                                           cfg.eval.score_error_samples, cfg.eval.seed)
                    score_errors[sp] = se
                    info["score_error"] = se["mean"]
    timings["teachers"] = tm.seconds

    # 3. evaluation sets (noise, exact ODE), teacher references and training pools per seed
    routes = sorted({(sp, kind, solver) for sp, kind, _, solver in todo})
    evals, refs, pools, references = {}, {}, {}, []
    with common.Timer() as tm:
        for sp in cfg.spaces:
            for seed in cfg.seeds:
                ev = evals[(sp, seed)] = make_eval_set(world, world.spaces[sp], seed, cfg.eval.num_samples,
                                                       cfg.eval.seed, cfg.guidance, cfg.eval.ode_rtol, dev)
                references.append(reference_row(world, world.spaces[sp], "exact ODE", "-", exact_samples(world, ev), None,
                                                ev, cfg.eval.memorisation_threshold))
    timings["eval_sets_and_exact_ode"] = tm.seconds
    with common.Timer() as tm:
        for sp, kind, solver in tqdm(routes, desc="references and pools", disable=not progress, leave=False):
            teacher = teachers[(sp, kind)][0]
            space = world.spaces[sp]
            for seed in cfg.seeds:
                ev = evals[(sp, seed)]
                ref = refs[(sp, kind, solver, seed)] = make_reference(world, space, teacher, solver, ev, dev)
                references.append(reference_row(world, space, f"{kind} teacher chain", solver, ref, ref, ev,
                                                cfg.eval.memorisation_threshold))
                pools[(sp, kind, solver, seed)] = build_pool(
                    teacher, solver, world.grid, space.train, space.labels if num_classes else None, cfg.train.pool_size,
                    pool_seed(seed), dtype=torch.float64 if kind == "exact" else torch.float32, device=dev)
    timings["references_and_pools"] = tm.seconds

    # 4. train every cell, both methods, all seeds at once; measure at every budget
    budgets = cfg.budgets()
    S = cfg.train.train_steps
    runs, curves, histories = [], [], {}
    plot: dict[str, Any] = {"samples": {}, "spectra": {}, "covariance": {}}
    for sp, kind, student, solver in tqdm(todo, desc="cells", disable=not progress, leave=False):
        space = world.spaces[sp]
        raw = teachers[(sp, kind)][1]
        x_T = torch.stack([evals[(sp, s)].x_T for s in cfg.seeds])
        labels = torch.stack([evals[(sp, s)].labels for s in cfg.seeds]) if num_classes else None
        for method in cfg.methods:
            cell = {"space": sp, "teacher": kind, "student": student, "solver": solver, "method": method}
            st = make_students(student, cfg.student, cfg.seeds, space.shape, world.schedule, space.sigma_data,
                               num_classes, teacher=raw if kind == "learned" else None, device=dev)
            final: dict[int, tuple[torch.Tensor, dict]] = {}

            def on_budget(step: int, students) -> None:
                outs = students.one_step(x_T.to(dev), t_T, None if labels is None else labels.to(dev)).double().cpu()
                for m, seed in enumerate(cfg.seeds):
                    ref, ev = refs[(sp, kind, solver, seed)], evals[(sp, seed)]
                    row = member_metrics(world, space, outs[m], ref, ev, step == S, cfg.eval.memorisation_threshold)
                    curves.append({**cell, "seed": seed, "step": step, **{k: row[k] for k in row if k in CURVE_KEYS}})
                    if step == S:
                        final[seed] = (outs[m], row)

            label = f"{sp}/{kind}/{student}/{solver}/{method}"
            hist = train_students(method, cfg.train, st, [pools[(sp, kind, solver, s)] for s in cfg.seeds], world.grid,
                                  world.schedule, on_budget, budgets, dev, progress=label if progress else False)
            histories[label] = hist.to_dict()
            timings[f"train {label}"] = hist.seconds
            if not progress:
                print(f"[image_world] {label}: trained {hist.seconds:.0f} s, measured {hist.eval_seconds:.0f} s "
                      f"({time.perf_counter() - start:.0f} s so far)", flush=True)
            loss = hist.window_mean(0.9, 1.01)
            mid = max([b for b in budgets if b <= S // 2], default=budgets[0])
            half = {c["seed"]: c["E_solver"] for c in curves
                    if c["step"] == mid and all(c[k] == v for k, v in cell.items())}
            for m, seed in enumerate(cfg.seeds):
                out, row = final[seed]
                e_half = half.get(seed, row["E_solver"])
                runs.append({**cell, "seed": seed, "final_loss": loss[m], **row, "E_solver_half": e_half, "half_step": mid,
                             "converged": abs(row["E_solver"] - e_half) <= 0.1 * max(e_half, 1e-12)})
            pix = [space.decode(final[s][0]) for s in cfg.seeds]
            plot["samples"][label] = pix[0][: cfg.eval.grid_images]
            plot["spectra"][label] = torch.stack([radial_power(p) for p in pix]).mean(0)
            plot["covariance"][label] = torch.stack([covariance_spectrum(p) for p in pix]).mean(0)
    for (sp, kind, solver, seed), ref in refs.items():
        if seed == cfg.seeds[0]:
            lab = f"{sp}/{kind}/teacher/{solver}"
            plot["samples"][lab] = ref.chain_pix[: cfg.eval.grid_images]
            plot["spectra"][lab] = radial_power(ref.chain_pix)
            plot["covariance"][lab] = covariance_spectrum(ref.chain_pix)
    for sp in cfg.spaces:
        ev = evals[(sp, cfg.seeds[0])]
        plot["samples"][f"{sp}/exact_ode"] = ev.exact_pix[: cfg.eval.grid_images]
    plot["spectra"]["data (train)"] = radial_power(world.data.train)
    plot["covariance"]["data (train)"] = covariance_spectrum(world.data.train)

    # 5. floors, summaries, verdicts
    floor = fd_floor(world, cfg.eval.floor_draws, cfg.eval.seed)
    summary = summarise(runs)
    verdict_sets = {q: verdicts(runs, q, quick) for q in ("fd_teacher", "fd_data")}
    timings["total"] = time.perf_counter() - start
    return {
        "study": "image_world", "quick": bool(quick),
        "world": {**world.info, "grid": world.grid.tolist(), "schedule": "sdxl (timestep_offset=1)",
                  "sigma_data": {sp: world.spaces[sp].sigma_data for sp in cfg.spaces}},
        "held_fixed": {"data_split": cfg.data.split_seed, "classifier_seed": cfg.classifier.seed,
                       "autoencoder_seed": cfg.autoencoder.seed, "teacher_seed": cfg.teacher.seed},
        "varied_by_seed": {"student_init": "seed", "batch_order": "seed", "pool": f"seed + {POOL_SEED_OFFSET}",
                           "eval_noise_and_labels": f"eval.seed ({cfg.eval.seed}) + seed"},
        "teachers": {f"{sp}/{kind}": info for (sp, kind), (_, _, info) in teachers.items()},
        "score_error": score_errors,
        "pools": {f"{sp}/{kind}/{solver}/{seed}": {"seconds": p.seconds, "teacher_evals": p.teacher_evals}
                  for (sp, kind, solver, seed), p in pools.items()},
        "budgets": budgets, "cells_skipped": skipped, "summary": summary, "runs": runs, "curves": curves,
        "references": references, "heldout": heldout_row(world, cfg.eval.memorisation_threshold), "floor_fd_data": floor,
        "verdicts": verdict_sets, "switch_effects": {q: switch_effects(v) for q, v in verdict_sets.items()},
        "histories": histories, "timings": timings, "_plot": plot,
    }


CURVE_KEYS = ("E_solver", "E_exact", "E_solver_pixel", "E_exact_pixel", "fd_teacher", "fd_data")
