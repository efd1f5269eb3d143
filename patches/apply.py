"""Patch an sd-scripts checkout (and LyCORIS' ``kohya.py``) to use this repository's optimizers.

    python -m patches.apply --sd-scripts PATH [--lycoris auto|none|PATH] [--root PATH]
                            [--check] [--revert] [--diff]

From Python: ``from patches.apply import apply, check, revert``.

Edits (each a block between ``# >>> hina-optimizers <id> >>>`` and ``# <<< hina-optimizers <id>
<<<`` lines, found by anchors, never by line numbers):

- ``library/train_util.py``, block ``runtime``, just before ``def get_optimizer(args,
  trainable_params)``: ``_hina_runtime()`` loads ``patches/hina_sdscripts.py`` of this
  repository by file path (nothing goes on ``sys.path``), ``hina_attach_param_names()``.
- ``library/train_util.py``, block ``get-optimizer``, inside ``get_optimizer`` after
  ``optimizer_type = optimizer_type.lower()`` and before ``optimizer_kwargs = {}`` (so before
  kohya's strict ``--optimizer_args`` parser and before every ``import bitsandbytes``): our
  registered names and aliases build our optimizer with our parser and return sd-scripts'
  ``(optimizer_name, optimizer_args, optimizer)`` triple; any other name falls through.
- ``train_network.py``, block ``param-names``, just before ``optimizer_name, optimizer_args,
  optimizer = train_util.get_optimizer(args, trainable_params)``: adds ``named`` lists built
  from ``network.named_parameters()`` to the groups (for our optimizers only).
- ``train_network.py``, block ``report-loss``, right after the training step's ``optimizer.step()``
  (the first one after ``accelerator.backward(loss)``, in the same block): when the optimizer
  inside accelerate's wrapper has ``report_loss`` (Automagic_CameAMP_COptim and its 8-bit form),
  hands it ``loss.detach()`` once per real update (``accelerator.sync_gradients``, step not
  skipped); no host sync.
- LyCORIS ``lycoris/kohya.py``, block ``lycoris-dedup``, in ``LycorisNetworkKohya.__init__`` just
  before the ``self.loras = self.text_encoder_loras + self.unet_loras`` that precedes its
  "duplicated lora name" assertion (no block where there is no such assertion): a module built
  twice for the same layer (lycoris-lora 4.x's default preset targets the class
  ``TimestepEmbedding`` and the names ``time_embedding.linear_1/2``) is kept once, with a warning;
  two layers sharing a name still fail the assertion.
- LyCORIS ``lycoris/kohya.py``, block ``lycoris-named``, at the end of the file (the class
  ``LycorisNetworkKohya`` and its ``def prepare_optimizer_params(self, ...)`` must exist):
  wraps the method so every group it returns carries ``named``.

Every edit for every file is computed before anything is written: if one anchor is missing,
nothing is modified and the error names the file and the anchor. Applying twice gives the same
bytes as applying once; ``--revert`` removes the blocks, giving back the original bytes (checked
against the ``<file>.hina-orig`` backup written by ``apply``). Writes are atomic (temporary
file + ``os.replace``); a failure part-way through a multi-file write restores the files
already written.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["apply", "check", "revert", "main", "PatchError", "Report", "FileResult", "strip_blocks"]

MARK = "hina-optimizers"
BACKUP_SUFFIX = ".hina-orig"
DEFAULT_ROOT = Path(__file__).resolve().parents[1]
_HEADER = "added by patches/apply.py of the hina optimizers; undo: python -m patches.apply --revert"
_START = re.compile(r"^[ \t]*# >>> hina-optimizers (?P<id>[\w-]+) >>>")
_END = "# <<< hina-optimizers {} <<<"


class PatchError(Exception):
    """An edit cannot be made (missing file or anchor, corrupt marker); nothing was modified."""

    def __init__(self, message: str, report: "Report | None" = None):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------- text helpers
def _split(text: str) -> list[str]:
    """Lines without their '\\n' ('\\r' of CRLF files stays); '\\n'.join() gives `text` back."""
    return text.split("\n")


def _view(lines: list[str]) -> list[str]:
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _is_code(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("#")


def _header_end(view: list[str], start: int) -> int:
    """Index of the line ending a (possibly multi-line) ``def``/``class`` header."""
    depth = 0
    for i in range(start, len(view)):
        code = view[i].split("#", 1)[0]
        depth += code.count("(") + code.count("[") - code.count(")") - code.count("]")
        if depth <= 0 and code.rstrip().endswith(":"):
            return i
    return start


def _block_end(view: list[str], start: int) -> int:
    """First index after the body of the ``def``/``class`` whose header starts at `start`."""
    level = len(_indent(view[start]))
    in_str = None
    for i in range(_header_end(view, start) + 1, len(view)):
        line = view[i]
        if in_str is None and _is_code(line) and len(_indent(line)) <= level:
            return i
        for quote in ('"""', "'''"):
            if (in_str is None or in_str == quote) and line.count(quote) % 2 == 1:
                in_str = None if in_str == quote else quote
    return len(view)


def _find(view: list[str], pattern: str, lo: int = 0, hi: int | None = None) -> int | None:
    rx = re.compile(pattern)
    for i in range(lo, len(view) if hi is None else hi):
        if rx.search(view[i]):
            return i
    return None


def _above(view: list[str], idx: int) -> int:
    """Move an insertion point up over comment lines (same indentation) glued to line `idx`."""
    ind = _indent(view[idx])
    while idx > 0 and view[idx - 1].strip().startswith("#") and _indent(view[idx - 1]) == ind:
        if _START.match(view[idx - 1]):
            break
        idx -= 1
    return idx


def strip_blocks(text: str) -> tuple[str, list[str]]:
    """`text` without any hina-optimizers block; also the ids removed. Raises PatchError on a
    start marker without its end marker."""
    lines = _split(text)
    view = _view(lines)
    out: list[str] = []
    ids: list[str] = []
    i = 0
    while i < len(lines):
        m = _START.match(view[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        end = _END.format(m.group("id"))
        j = next((k for k in range(i + 1, len(view)) if view[k].strip() == end), None)
        if j is None:
            raise PatchError(f"line {i + 1}: marker '# >>> {MARK} {m.group('id')} >>>' has no end marker {end!r}")
        ids.append(m.group("id"))
        i = j + 1
    return "\n".join(out), ids


# --------------------------------------------------------------------------- edits
@dataclass
class Edit:
    block: str
    anchor: str
    index: int  # 0-based line of the original (stripped) text the block is inserted before
    lines: list[str]
    eof: bool = False  # appended at the end of the file

    @property
    def where(self) -> str:
        return "at the end of the file" if self.eof else f"before line {self.index + 1}"


class _Missing(Exception):
    pass


def _marked(block: str, indent: str, body: list[str]) -> list[str]:
    out = [f"{indent}# >>> {MARK} {block} >>> {_HEADER}"]
    out += [(indent + ln) if ln else "" for ln in body]
    out.append(indent + _END.format(block))
    return out


def _runtime_block(root: Path) -> list[str]:
    return [
        f"_HINA_OPTIMIZERS_ROOT = {str(root)!r}",
        "",
        "",
        "def _hina_runtime():",
        '    """patches/hina_sdscripts.py of the hina optimizers repository (HINA_OPTIMIZERS_ROOT overrides)."""',
        "    import importlib.util",
        "    import os",
        "    import sys",
        "",
        '    root = os.environ.get("HINA_OPTIMIZERS_ROOT") or _HINA_OPTIMIZERS_ROOT',
        '    runtime = sys.modules.get("hina_sdscripts")',
        "    if runtime is None:",
        '        path = os.path.join(root, "patches", "hina_sdscripts.py")',
        "        if not os.path.isfile(path):",
        "            raise ImportError(",
        '                f"hina-optimizers patch: {path} not found; set HINA_OPTIMIZERS_ROOT to the hina "',
        '                "optimizers repository, or undo the patch: python -m patches.apply --revert"',
        "            )",
        '        spec = importlib.util.spec_from_file_location("hina_sdscripts", path)',
        "        runtime = importlib.util.module_from_spec(spec)",
        '        sys.modules["hina_sdscripts"] = runtime',
        "        try:",
        "            spec.loader.exec_module(runtime)",
        "        except BaseException:",
        '            sys.modules.pop("hina_sdscripts", None)',
        "            raise",
        "    runtime.install(root)",
        "    return runtime",
        "",
        "",
        "def hina_attach_param_names(trainable_params, network, args=None):",
        '    """Parameter names for name-aware optimizers (called by the patched train_network.py)."""',
        "    return _hina_runtime().attach_names(trainable_params, network, args)",
        "",
        "",
    ]


def _plan_train_util(view: list[str], root: Path) -> list[Edit]:
    missing = []
    d = _find(view, r"^def get_optimizer\(\s*args\s*,\s*trainable_params\s*\)\s*(->[^:]*)?:\s*(#.*)?$")
    if d is None:
        raise _Missing("def get_optimizer(args, trainable_params)")
    end = _block_end(view, d)
    low = _find(view, r"^\s+optimizer_type = optimizer_type\.lower\(\)\s*(#.*)?$", d + 1, end)
    if low is None:
        missing.append("optimizer_type = optimizer_type.lower()  (inside get_optimizer)")
    kw = None if low is None else _find(view, r"^\s+optimizer_kwargs = \{\}\s*(#.*)?$", low + 1, end)
    if low is not None and kw is None:
        missing.append("optimizer_kwargs = {}  (inside get_optimizer, after optimizer_type.lower())")
    if _find(view, r"^\s+return optimizer_name, optimizer_args, optimizer\s*(#.*)?$", d + 1, end) is None:
        missing.append("return optimizer_name, optimizer_args, optimizer  (inside get_optimizer)")
    if missing:
        raise _Missing("; ".join(missing))
    at = _above(view, kw)
    for i in range(d + 1, at):
        if "bitsandbytes" in view[i] and _is_code(view[i]):
            raise _Missing(f"our branch must precede every bitsandbytes import; line {i + 1} imports it first")
        if '.split("=")' in view[i] and _is_code(view[i]):
            raise _Missing(f"our branch must precede kohya's --optimizer_args parsing; line {i + 1} parses first")
    ind = _indent(view[kw])
    return [
        Edit("runtime", "def get_optimizer(args, trainable_params)", _above(view, d), _marked("runtime", "", _runtime_block(root))),
        Edit(
            "get-optimizer",
            "optimizer_kwargs = {} after optimizer_type = optimizer_type.lower() in get_optimizer",
            at,
            _marked(
                "get-optimizer",
                ind,
                [
                    "_hina_result = _hina_runtime().build_optimizer(args, optimizer_type, trainable_params)",
                    "if _hina_result is not None:  # one of our names: skip kohya's parser and 8bit branch",
                    "    return _hina_result",
                ],
            ),
        ),
    ]


def _plan_train_network(view: list[str], root: Path) -> list[Edit]:
    g = _find(
        view,
        r"^\s*optimizer_name, optimizer_args, optimizer = train_util\.get_optimizer\(\s*args\s*,\s*trainable_params\s*\)\s*(#.*)?$",
    )
    if g is None:
        raise _Missing("optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)")
    if _find(view, r"\bnetwork\.prepare_optimizer_params\(", 0, g) is None:
        raise _Missing("network.prepare_optimizer_params(...) before the train_util.get_optimizer call")
    ind = _indent(view[g])
    return [
        Edit(
            "param-names",
            "optimizer_name, optimizer_args, optimizer = train_util.get_optimizer(args, trainable_params)",
            g,
            _marked(
                "param-names",
                ind,
                [
                    'if hasattr(train_util, "hina_attach_param_names"):  # names for name-aware optimizers',
                    "    trainable_params = train_util.hina_attach_param_names(trainable_params, network, args)",
                ],
            ),
        ),
        _report_loss_edit(view, g),
    ]


_REPORT_LOSS_BLOCK = [
    '_hina_optimizer = getattr(optimizer, "optimizer", optimizer)  # the one inside accelerate\'s wrapper',
    "if (",
    "    accelerator.sync_gradients",
    '    and hasattr(_hina_optimizer, "report_loss")',
    '    and not getattr(optimizer, "step_was_skipped", False)',
    "):  # loss-aware optimizers (C-Optim): once per real update; the tensor stays on its device",
    "    _hina_optimizer.report_loss(loss.detach())",
]


def _report_loss_edit(view: list[str], after: int) -> Edit:
    """Block ``report-loss``: right after the training step's ``optimizer.step()`` (the first one
    following ``accelerator.backward(loss)``, in the same block), hand the loss to the optimizer."""
    b = _find(view, r"^\s+accelerator\.backward\(loss\)\s*(#.*)?$", after + 1)
    if b is None:
        raise _Missing("accelerator.backward(loss)  (the training step, after the train_util.get_optimizer call)")
    level = _indent(view[b])
    for i in range(b + 1, len(view)):
        if _is_code(view[i]) and len(_indent(view[i])) < len(level):
            break
        if _indent(view[i]) == level and re.match(r"^\s+optimizer\.step\(\)\s*(#.*)?$", view[i]):
            return Edit(
                "report-loss",
                "optimizer.step() after accelerator.backward(loss)",
                i + 1,
                _marked("report-loss", level, _REPORT_LOSS_BLOCK),
            )
    raise _Missing("optimizer.step() after accelerator.backward(loss), in the same block")


_LYCORIS_BLOCK = [
    "",
    "",
    "def _hina_named_param_groups(prepare):",
    '    """Wrap prepare_optimizer_params: each returned group gets "named", aligned with "params"."""',
    "    import functools",
    "",
    "    import torch",
    "",
    "    @functools.wraps(prepare)",
    "    def prepare_optimizer_params(self, *args, **kwargs):",
    "        result = prepare(self, *args, **kwargs)",
    "        groups = result[0] if isinstance(result, tuple) else result",
    "        names = {}",
    "        for name, param in self.named_parameters():",
    "            names.setdefault(id(param), name)",
    '        for lora in list(getattr(self, "text_encoder_loras", None) or []) + list(getattr(self, "unet_loras", None) or []):',
    "            for name, param in lora.named_parameters():  # modules not yet added by apply_to()",
    '                names.setdefault(id(param), f"{lora.lora_name}.{name}")',
    "        for group in groups if isinstance(groups, (list, tuple)) else ():",
    '            if not isinstance(group, dict) or "named" in group or "params" not in group:',
    "                continue",
    '            params = group["params"]',
    "            params = [params] if isinstance(params, torch.Tensor) else list(params)",
    "            named = [names.get(id(p)) for p in params]",
    "            if None not in named:",
    '                group["params"] = params',
    '                group["named"] = named',
    "        return result",
    "",
    "    prepare_optimizer_params._hina_named = True",
    "    return prepare_optimizer_params",
    "",
    "",
    'if not getattr(LycorisNetworkKohya.prepare_optimizer_params, "_hina_named", False):',
    "    LycorisNetworkKohya.prepare_optimizer_params = _hina_named_param_groups(",
    "        LycorisNetworkKohya.prepare_optimizer_params",
    "    )",
]


_LYCORIS_DEDUP_BLOCK = [
    "# a preset may target one layer twice (lycoris-lora 4.x's default: the class TimestepEmbedding and",
    "# the names time_embedding.linear_1/2): keep one module per layer instead of failing the check below",
    "_hina_first = {}",
    "_hina_dropped = []",
    'for _hina_attr in ("text_encoder_loras", "unet_loras"):',
    "    _hina_kept = []",
    "    for _hina_lora in getattr(self, _hina_attr):",
    "        _hina_seen = _hina_first.setdefault(_hina_lora.lora_name, _hina_lora)",
    '        _hina_layers = [(getattr(m, "org_module", None) or [m])[0] for m in (_hina_seen, _hina_lora)]',
    "        if _hina_seen is not _hina_lora and _hina_layers[0] is _hina_layers[1]:",
    "            _hina_dropped.append(_hina_lora.lora_name)  # the same layer again: drop the copy",
    "        else:",
    "            _hina_kept.append(_hina_lora)  # (a name shared by two layers still fails the check)",
    "    if len(_hina_kept) != len(getattr(self, _hina_attr)):",
    "        setattr(self, _hina_attr, _hina_kept)",
    "if _hina_dropped:",
    "    import logging as _hina_logging",
    "",
    "    _hina_logging.getLogger(__name__).warning(",
    '        "hina-optimizers patch: %d layer(s) targeted twice by the LyCORIS preset, kept once: %s",',
    '        len(_hina_dropped),',
    '        ", ".join(_hina_dropped),',
    "    )",
]


def _dedup_edits(view: list[str], c: int, end: int) -> list[Edit]:
    """Block ``lycoris-dedup`` in ``LycorisNetworkKohya.__init__``, just before the
    ``self.loras = self.text_encoder_loras + self.unet_loras`` that precedes its "duplicated lora
    name" assertion. None when __init__ has no such assertion (nothing would fail)."""
    init = _find(view, r"^\s+def __init__\(", c + 1, end)
    init_end = None if init is None else _block_end(view, init)
    check = None if init is None else _find(view, r"duplicated lora name", init, init_end)
    if check is None:
        return []
    rx = re.compile(r"^\s+self\.loras = self\.text_encoder_loras \+ self\.unet_loras\s*(#.*)?$")
    at = next((i for i in range(check - 1, init, -1) if rx.match(view[i])), None)
    if at is None:
        raise _Missing(
            "self.loras = self.text_encoder_loras + self.unet_loras before the 'duplicated lora name' "
            "check in LycorisNetworkKohya.__init__"
        )
    return [
        Edit(
            "lycoris-dedup",
            "self.loras = self.text_encoder_loras + self.unet_loras before the 'duplicated lora name' check",
            _above(view, at),
            _marked("lycoris-dedup", _indent(view[at]), _LYCORIS_DEDUP_BLOCK),
        )
    ]


def _plan_lycoris(view: list[str], root: Path) -> list[Edit]:
    c = _find(view, r"^class LycorisNetworkKohya\b")
    if c is None:
        raise _Missing("class LycorisNetworkKohya")
    end = _block_end(view, c)
    m = _find(view, r"^\s+def prepare_optimizer_params\(", c + 1, end)
    if m is None:
        raise _Missing("def prepare_optimizer_params(self, ...) in class LycorisNetworkKohya")
    header = " ".join(view[m : _header_end(view, m) + 1])
    if not re.search(r"def prepare_optimizer_params\(\s*self\b", header):
        raise _Missing("def prepare_optimizer_params(self, ...) in class LycorisNetworkKohya")
    eof = len(view) - 1 if view[-1] == "" else len(view)
    return _dedup_edits(view, c, end) + [
        Edit(
            "lycoris-named",
            "class LycorisNetworkKohya with def prepare_optimizer_params(self, ...)",
            eof,
            _marked("lycoris-named", "", _LYCORIS_BLOCK),
            eof=True,
        )
    ]


# --------------------------------------------------------------------------- results
@dataclass
class FileResult:
    role: str
    path: Path
    status: str = ""  # would-patch | patched | applied | would-revert | reverted | clean | error | skipped
    edits: list[Edit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    current: bytes | None = field(default=None, repr=False)
    original: bytes | None = field(default=None, repr=False)
    new: bytes | None = field(default=None, repr=False)

    @property
    def changes(self) -> bool:
        return self.new is not None and self.current is not None and self.new != self.current

    def diff(self) -> str:
        if not self.changes:
            return ""
        a = self.current.decode("utf-8", "replace").splitlines(keepends=True)
        b = self.new.decode("utf-8", "replace").splitlines(keepends=True)
        return "".join(difflib.unified_diff(a, b, str(self.path), str(self.path) + " (new)"))


@dataclass
class Report:
    action: str  # check | apply | revert
    files: list[FileResult]
    changed: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.errors for f in self.files)

    @property
    def supported(self) -> bool:
        return self.ok

    def format(self, diff: bool = False) -> str:
        out = []
        for f in self.files:
            out.append(f"{f.role}: {f.path}")
            out.append(f"  status: {f.status}")
            for e in f.edits:
                out.append(f"  block '{e.block}' {e.where} (anchor: {e.anchor})")
            out += [f"  ERROR: {m}" for m in f.errors]
            out += [f"  note: {m}" for m in f.notes]
            if diff and f.changes:
                out.append(f.diff().rstrip("\n"))
        if self.action == "check":
            out.append(
                "supported: yes (every anchor found)" if self.ok else "supported: NO (see ERROR lines; nothing was changed)"
            )
        elif not self.ok:
            out.append("nothing was modified")
        else:
            out.append(f"{len(self.changed)} file(s) written" if self.changed else "nothing to do")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()


# --------------------------------------------------------------------------- targets
_PLANNERS = {"train_util": _plan_train_util, "train_network": _plan_train_network, "lycoris": _plan_lycoris}
_OFF = {"none", "no", "off", "skip", "false", ""}


def _installed_lycoris() -> Path | None:
    try:
        spec = importlib.util.find_spec("lycoris")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / "kohya.py"
        if p.is_file():
            return p
    return None


def _lycoris_path(lycoris) -> tuple[Path | None, str | None, str | None]:
    """(kohya.py path or None, note, error)."""
    if lycoris is None or (isinstance(lycoris, str) and lycoris.lower() in _OFF):
        return None, "LyCORIS: skipped (--lycoris none)", None
    if isinstance(lycoris, str) and lycoris.lower() == "auto":
        p = _installed_lycoris()
        if p is None:
            return None, f"LyCORIS: not installed for {sys.executable}; skipped (pass --lycoris PATH to patch one)", None
        return p, None, None
    p = Path(lycoris).expanduser()
    for cand in (p, p / "kohya.py", p / "lycoris" / "kohya.py"):
        if cand.is_file():
            return cand.resolve(), None, None
    return None, None, f"LyCORIS: no kohya.py at {p} (give the file, the lycoris package or the LyCORIS checkout)"


def _targets(sd_scripts, lycoris) -> tuple[list[FileResult], list[str]]:
    files: list[FileResult] = []
    sd = Path(sd_scripts).expanduser().resolve()
    files.append(FileResult("train_util", sd / "library" / "train_util.py"))
    files.append(FileResult("train_network", sd / "train_network.py"))
    notes = []
    for old in ("library/custom_hina_adaptive_adamw_optimizer.py", "library/custom_hina_adamw_optimizer.py", "library/optimizers"):
        if (sd / old).exists():
            notes.append(
                f"{sd / old} exists in the checkout and shadows this repository's copy (sd-scripts' "
                "library directory comes first); remove it unless it is a link to this repository"
            )
    path, note, error = _lycoris_path(lycoris)
    if note:
        notes.append(note)
    if error:
        bad = FileResult("lycoris", Path(str(lycoris)))
        bad.errors.append(error)
        bad.status = "error"
        files.append(bad)
    elif path is not None:
        files.append(FileResult("lycoris", path))
    return files, notes


_ROLE_LABEL = {
    "train_util": "sd-scripts library/train_util.py",
    "train_network": "sd-scripts train_network.py",
    "lycoris": "LyCORIS lycoris/kohya.py",
}


def _read(f: FileResult) -> str | None:
    if f.errors:
        return None
    if not f.path.is_file():
        f.errors.append(f"{f.path}: file not found")
        f.status = "error"
        return None
    f.current = f.path.read_bytes()
    try:
        return f.current.decode("utf-8")
    except UnicodeDecodeError as e:
        f.errors.append(f"{f.path}: not UTF-8 ({e})")
        f.status = "error"
        return None


def _plan(sd_scripts, lycoris, root) -> tuple[list[FileResult], list[str]]:
    root = Path(root or DEFAULT_ROOT).expanduser().resolve()
    files, notes = _targets(sd_scripts, lycoris)
    for need in ("patches/hina_sdscripts.py", "library/optimizers/registry.py", "networks/names.py"):
        if not (root / need).is_file():
            files[0].errors.append(f"--root {root}: {need} not found (not the hina optimizers repository)")
    for f in files:
        text = _read(f)
        if text is None:
            continue
        try:
            stripped, ids = strip_blocks(text)
        except PatchError as e:
            f.errors.append(f"{f.path}: {e}")
            f.status = "error"
            continue
        f.original = stripped.encode("utf-8")
        lines = _split(stripped)
        try:
            edits = _PLANNERS[f.role](_view(lines), root)
        except _Missing as e:
            f.errors.append(f"{f.path}: anchor not found: {e}")
            f.status = "error"
            continue
        eol = "\r" if "\r\n" in stripped else ""
        new = list(lines)
        for e in sorted(edits, key=lambda e: e.index, reverse=True):
            new[e.index : e.index] = [ln + eol for ln in e.lines]
        f.edits = sorted(edits, key=lambda e: e.index)
        f.new = "\n".join(new).encode("utf-8")
    return files, notes


# --------------------------------------------------------------------------- writing
def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # keep the file's mode (a new backup takes the mode of the file it backs up)
        like = path if path.exists() else path.with_name(path.name[: -len(BACKUP_SUFFIX)])
        if like.name and like.exists():
            os.chmod(tmp, like.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_all(ops: list[tuple[Path, bytes | None]]) -> list[Path]:
    """Write (path, bytes) or delete (path, None) every entry; on failure undo what was done."""
    for path, _ in ops:
        if not os.access(path.parent, os.W_OK):
            raise PatchError(f"{path.parent}: directory is not writable; nothing was modified")
    done: list[tuple[Path, bytes | None]] = []
    try:
        for path, data in ops:
            before = path.read_bytes() if path.exists() else None
            if data is None:
                if before is not None:
                    path.unlink()
            else:
                _atomic_write(path, data)
            done.append((path, before))
    except BaseException as exc:
        for path, before in reversed(done):
            try:
                if before is None:
                    path.unlink(missing_ok=True)
                else:
                    _atomic_write(path, before)
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise PatchError(f"writing {path} failed ({exc}); files already written were restored") from exc
        raise
    return [p for p, _ in ops]


def _backup(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


# --------------------------------------------------------------------------- API
def check(sd_scripts, lycoris="auto", root=None) -> Report:
    """Dry run: what `apply` would change, and whether every anchor is found. Writes nothing."""
    files, notes = _plan(sd_scripts, lycoris, root)
    for f in files:
        if f.errors:
            f.status = "error"
        elif f.changes:
            f.status = "would update outdated blocks" if f.current != f.original else "would patch"
        else:
            f.status = "already applied"
    files[0].notes.extend(notes)
    for f in files:
        f.role = _ROLE_LABEL.get(f.role, f.role)
    return Report("check", files)


def apply(sd_scripts, lycoris="auto", root=None) -> Report:
    """Patch every target file, or none: raises PatchError (naming file and anchor) if any
    edit cannot be computed. Idempotent. Writes ``<file>.hina-orig`` with the original bytes."""
    report = check(sd_scripts, lycoris, root)
    report.action = "apply"
    if not report.ok:
        raise PatchError(_errors(report), report)
    ops: list[tuple[Path, bytes | None]] = []
    for f in report.files:
        if f.changes:
            b = _backup(f.path)
            if not b.exists() or b.read_bytes() != f.original:
                ops.append((b, f.original))
            ops.append((f.path, f.new))
    report.changed = [p for p in _write_all(ops) if not p.name.endswith(BACKUP_SUFFIX)]
    for f in report.files:
        f.status = "patched" if f.path in report.changed else "already applied"
    return report


def revert(sd_scripts, lycoris="auto", root=None) -> Report:
    """Remove every marked block (all files or none); the result is checked against the
    ``.hina-orig`` backup, which is then deleted. Files edited after patching keep those edits
    (the backup is then kept and a note says so)."""
    files, notes = _targets(sd_scripts, lycoris)
    ops: list[tuple[Path, bytes | None]] = []
    for f in files:
        if f.errors:
            continue
        if not f.path.is_file():
            f.status = "not found (skipped)"
            continue
        f.current = f.path.read_bytes()
        b = _backup(f.path)
        backup = b.read_bytes() if b.exists() else None
        try:
            stripped, ids = strip_blocks(f.current.decode("utf-8"))
            f.new = stripped.encode("utf-8")
        except (PatchError, UnicodeDecodeError) as e:
            if backup is None:
                f.errors.append(f"{f.path}: {e}; no {b.name} backup to restore from")
                continue
            f.notes.append(f"{e}; restoring {b.name}")
            f.new, ids = backup, ["?"]
        if backup is not None and backup != f.new:
            f.notes.append(
                f"{f.path.name} changed since it was patched: blocks removed, other edits kept; "
                f"the pre-patch bytes stay in {b.name}"
            )
        elif backup is not None:
            ops.append((b, None))
        if f.changes:
            ops.append((f.path, f.new))
            f.status = "would revert"
        else:
            f.status = "clean (no hina-optimizers block)"
    report = Report("revert", files)
    files[0].notes.extend(notes)
    for f in files:
        f.role = _ROLE_LABEL.get(f.role, f.role)
    if not report.ok:
        raise PatchError(_errors(report), report)
    written = _write_all(ops)
    report.changed = [p for p in written if not p.name.endswith(BACKUP_SUFFIX)]
    for f in files:
        if f.path in report.changed:
            f.status = "reverted"
    return report


def _errors(report: Report) -> str:
    lines = [f"{f.role}: {m}" for f in report.files for m in f.errors]
    if any(f.errors and "LyCORIS" in f.role for f in report.files):
        lines.append("(--lycoris none leaves LyCORIS alone and patches sd-scripts only)")
    return "cannot patch; nothing was modified:\n  " + "\n  ".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m patches.apply",
        description="Make an sd-scripts checkout (and LyCORIS) use the hina optimizers. "
        "All edits or none; idempotent; --revert restores the original bytes.",
    )
    p.add_argument("--sd-scripts", required=True, metavar="PATH", help="the sd-scripts checkout (has library/train_util.py)")
    p.add_argument(
        "--lycoris",
        default="auto",
        metavar="auto|none|PATH",
        help="LyCORIS kohya.py to patch: 'auto' (default) = the lycoris package this Python imports "
        "(skipped if absent), 'none' = leave LyCORIS alone, or a path (kohya.py, the lycoris package, or a checkout)",
    )
    p.add_argument("--root", default=None, metavar="PATH", help=f"this repository, written into the patch (default {DEFAULT_ROOT})")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="dry run: say what would change and whether this version is supported")
    mode.add_argument("--revert", action="store_true", help="remove the patch, restoring the original bytes")
    p.add_argument("--diff", action="store_true", help="also print unified diffs of the changes (with --check or apply)")
    a = p.parse_args(argv)
    try:
        if a.check:
            report = check(a.sd_scripts, a.lycoris, a.root)
            print(report.format(diff=a.diff))
            return 0 if report.ok else 1
        if a.revert:
            report = revert(a.sd_scripts, a.lycoris, a.root)
        else:
            if a.diff:
                print("\n".join(f.diff() for f in check(a.sd_scripts, a.lycoris, a.root).files if f.changes))
            report = apply(a.sd_scripts, a.lycoris, a.root)
        print(report.format())
        return 0
    except PatchError as e:
        if e.report is not None:
            print(e.report.format(), file=sys.stderr)
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
