"""Patch set that lets an existing kohya sd-scripts checkout (and LyCORIS) use our optimizers.

- ``patches/apply.py``: the tool, ``python -m patches.apply --sd-scripts PATH [--lycoris
  PATH|auto|none] [--check] [--revert]``; from Python ``from patches.apply import apply,
  check, revert``.
- ``patches/hina_sdscripts.py``: the code the inserted blocks call at run time (loaded by file
  path inside the sd-scripts process; see its docstring for why nothing goes on ``sys.path``).

See docs/integration.md.
"""
