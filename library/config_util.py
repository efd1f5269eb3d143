"""``--config_file`` TOML handling with sd-scripts' semantics, plus clear errors.

- One level of sections is flattened (section names are free-form and ignored).
- The command line overrides the file; the file overrides the defaults.
- A syntax error is reported with its line; an unknown key with the closest known option.
- ``--output_config`` writes the non-default arguments to a TOML file.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys

from .errors import UserError

try:  # Python 3.11+
    import tomllib as _toml_reader
except ModuleNotFoundError:  # pragma: no cover
    _toml_reader = None


def load_toml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        if _toml_reader is not None:
            with open(path, "rb") as f:
                return _toml_reader.load(f)
        import toml

        with open(path, encoding="utf-8") as f:
            return toml.load(f)
    except UnicodeDecodeError as e:
        raise UserError(f"config file {path} is not UTF-8 text: {e}") from None
    except Exception as e:  # tomllib.TOMLDecodeError / toml.TomlDecodeError carry the line
        msg = str(e).splitlines()[0]
        raise UserError(f"invalid TOML in {path}: {msg}") from None


def flatten(config: dict, path: str = "") -> dict:
    """Hoist the keys of top-level tables to the top (sd-scripts' one-level flattening)."""
    flat = {}
    for key, value in config.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        for k, v in items:
            if isinstance(v, dict):
                raise UserError(f"config {path}: nested table [{key}.{k}] is not supported (one level of sections only)")
            if k in flat:
                raise UserError(f"config {path}: key {k!r} is set twice")
            flat[k] = v
    return flat


def _dests(parser: argparse.ArgumentParser) -> dict:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", argparse.SUPPRESS)}


def suggest(name: str, known) -> str | None:
    """The known option ``name`` was probably meant to be, or None. Close in spelling is not enough:
    the first word (what the option is about: ``save`` / ``sample``, ``min`` / ``max``) must be the
    same, or a misspelling of it with the rest equal, so ``load_every_n_epochs`` is not sent to
    ``save_every_n_epochs``."""
    head, _, rest = name.partition("_")
    for candidate in difflib.get_close_matches(name, list(known), n=5, cutoff=0.75):
        c_head, _, c_rest = candidate.partition("_")
        if c_head == head or (c_rest == rest and difflib.SequenceMatcher(None, head, c_head).ratio() >= 0.75):
            return candidate
    return None


def describe_unknown(names, known, dashes: str = "") -> str:
    """One sentence for every option name not in ``known``: sd-scripts options this trainer does not
    support, then unknown names with a suggestion where one is meant. Empty when there are none."""
    from .sd_scripts_options import OPTIONS as UPSTREAM

    names = list(dict.fromkeys(names))
    if not names:
        return ""
    upstream = [n for n in names if n in UPSTREAM]
    unknown = [n for n in names if n not in UPSTREAM]
    parts = []
    if upstream:
        parts.append("sd-scripts options this trainer does not support: "
                     + ", ".join(dashes + n for n in upstream) + " (docs/trainer.md lists what is accepted)")
    if unknown:
        hints = []
        for n in unknown:
            guess = suggest(n, known)
            hints.append(f"{dashes}{n}" + (f" (did you mean {dashes}{guess}?)" if guess else ""))
        parts.append("unknown option" + ("s" if len(unknown) > 1 else "") + ": " + ", ".join(hints))
    return "; ".join(parts)


def parse_with_config(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv``; if ``--config_file`` is given, use the file for every option not on the command line."""
    args = parser.parse_args(argv)
    if not getattr(args, "config_file", None):
        return args
    path = args.config_file
    if not os.path.splitext(path)[1]:
        path += ".toml"
    if getattr(args, "output_config", False):
        return args
    flat = flatten(load_toml(path), path)
    dests = _dests(parser)
    problem = describe_unknown([k for k in flat if k not in dests], list(dests))
    if problem:
        raise UserError(f"config {path}: {problem}")
    for key, value in flat.items():
        action = dests[key]
        if action.type is not None and isinstance(value, str) and action.type is not str:
            try:
                value = action.type(value)
            except Exception:
                raise UserError(f"config {path}: {key} = {value!r} is not a valid value") from None
        if action.nargs in ("*", "+") and isinstance(value, str):
            value = [value]
        if action.choices is not None:
            vals = value if isinstance(value, list) else [value]
            for v in vals:
                if v not in action.choices:
                    raise UserError(f"config {path}: {key} = {v!r} is not one of {list(action.choices)}")
    ns = argparse.Namespace(**flat)
    args = parser.parse_args(argv, namespace=ns)
    args.config_file = path
    return args


def output_config(parser: argparse.ArgumentParser, args: argparse.Namespace, path: str) -> str:
    """Write the non-default arguments to ``path`` (TOML) atomically."""
    import toml

    if not os.path.splitext(path)[1]:
        path += ".toml"
    skip = {"config_file", "output_config"}
    out = {}
    for dest, action in _dests(parser).items():
        if dest in skip:
            continue
        value = getattr(args, dest, None)
        if value is None or value == action.default:
            continue
        out[dest] = value
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        toml.dump(out, f)
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)
    return path
