"""odecm: consistency distillation and Direct CD on one backend-agnostic PF-ODE core.

Submodules:

* the PF-ODE core: ``schedules`` (the interface in ``schedule_base``, the discrete schedule in
  ``discrete_schedule``), ``denoisers``, ``grids``, ``solvers``, ``consistency``, ``objectives``
  (its distances in ``distances``), ``metrics``;
* training: ``training`` (the loop), ``trainer_checkpoints`` (its checkpoint / resume half),
  ``target`` (EMA / stop-gradient target), ``optim``, ``checkpoint`` (pickle-free on-disk format),
  ``runs`` (run folders, resume policy), ``distributed`` (decisions shared by every rank);
* configuration: ``config`` (pydantic models), ``cli`` (the one command line of every entry point).

Nothing here imports toys, sdxl or diffusers.
"""
__version__ = "0.1.0"
