"""odecm: consistency distillation and Direct CD on one backend-agnostic PF-ODE core.

Submodules: schedules, denoisers, grids, solvers, consistency, objectives, training, metrics, config.
Nothing here imports toys, sdxl or diffusers.
"""
__version__ = "0.1.0"
