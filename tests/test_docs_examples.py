"""The documentation's code runs, and its reference tables match the code.

- every ``docs/examples/*.py`` runs in a subprocess (cwd = repository root, PYTHONPATH = root,
  HF_HUB_OFFLINE=1), exits 0 and prints what it is meant to show;
- every Python block marked runnable in the docs (an HTML comment ``<!-- runnable -->`` on the
  line before a fenced ``python`` block) runs the same way;
  (the selected scripts are all started when the first of them is needed, two at a time, each
  still in its own interpreter: most of their time is starting Python and importing torch)
- the constructor-argument tables of docs/optimizers.md (English and zh-TW) list every argument
  of AdaptiveHinaAdamW and HinaAdamWOptimizer with its real default;
- docs/trainer.md (English and zh-TW) names every train_network.py option, and no option that
  does not exist;
- relative links in these docs point to files that exist (or are announced as coming).
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
EXAMPLES = os.path.join(DOCS, "examples")
LANGS = ("", "zh-TW")  # docs/<file> and docs/zh-TW/<file>
OWN_PAGES = ("README.md", "optimizers.md", "trainer.md", "troubleshooting.md", "automagic.md")
# pages other helpers or scripts write; links to them are allowed before they exist
PENDING = {"benchmarks.md", "integration.md"}

# what each example must print (besides exiting 0)
EXPECTED = {
    "basic_usage.py": ["pairs found: 2 (method: names)", "loss: first step", "basic_usage: OK"],
    "full_usage.py": ["pairing method now: names", "get_optimization_info()", "get_lr_mask_analysis()",
                      "diagnostics_scalars()", "parameters bit-identical: True", "full_usage: OK"],
    "optimizer_8bit_example.py": ["exp_avg_f8", "lr_mask_f8", "bit-identical after 10 more steps: True",
                                  "optimizer_8bit_example: OK"],
    "hina_adamw_lokr_example.py": ["detection: names", "lokr_stats:", "'lokr_groups': 2", "0 unpaired",
                                   "hina_adamw_lokr_example: OK"],
    "profile_example.py": ["ILLUSTRATIVE", "+ OrthoGrad", "defaults (all default-on)", "profile_example: OK"],
    "coptim_8bit_example.py": ["within bounds (0.5, 2.0)", "at the step after it", "lr_mask_lq", "exp_avg_f8",
                               "resume bit-identical after 10 more steps: True", "coptim_8bit_example: OK"],
    "automagic_refactored_example.py": ["warmup_early", "warmup_late", "stable", "mature", "custom strategy",
                                        "config restored: True", "resume bit-identical after 25 more steps: True",
                                        "automagic_refactored_example: OK"],
}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(path: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, path], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


_WORKERS = 2  # scripts run at once


class _Started:
    """Scripts started ahead of the tests that check them, ``_WORKERS`` at a time (``_run``)."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS)
        self._runs = {}

    def start(self, key, path: str, timeout: int) -> None:
        if key not in self._runs:
            self._runs[key] = self._pool.submit(_run, path, timeout)

    def result(self, key) -> subprocess.CompletedProcess:
        return self._runs[key].result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)  # scripts no test waits for (-x) never start


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """Every selected example and runnable block of this module, started at once."""
    runs, folder = _Started(), tmp_path_factory.mktemp("blocks")
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is not request.module or not params:
            continue
        if item.originalname == "test_example_runs":
            runs.start(params["name"], os.path.join(EXAMPLES, params["name"]), 600)
        elif item.originalname == "test_runnable_block_executes":
            script = folder / f"{params['page'].replace(os.sep, '_')}_{params['index']}.py"
            script.write_text(params["code"], encoding="utf-8")
            runs.start((params["page"], params["index"]), str(script), 300)
    yield runs
    runs.close()


def _examples() -> list[str]:
    return sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))


def _page(lang: str, name: str) -> str:
    return os.path.join(DOCS, lang, name) if lang else os.path.join(DOCS, name)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------ examples
def test_the_examples_listed_here_exist():
    missing = sorted(set(EXPECTED) - set(_examples()))
    assert not missing, missing


@pytest.mark.parametrize("name", _examples())
def test_example_runs(name, started):
    res = started.result(name)
    assert res.returncode == 0, f"{name} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    out = res.stdout
    assert out.strip(), f"{name} printed nothing"
    for text in EXPECTED.get(name, []):
        assert text in out, f"{name}: {text!r} not in its output:\n{out[-3000:]}"


def test_every_example_is_listed_in_the_examples_readme():
    readme = _read(os.path.join(EXAMPLES, "README.md"))
    for name in _examples():
        assert name in readme, f"docs/examples/README.md does not mention {name}"


# ------------------------------------------------------ runnable doc blocks
_BLOCK = re.compile(r"<!--\s*runnable\s*-->\s*\n```python\n(.*?)\n```", re.S)


def _runnable_blocks() -> list:
    out = []
    for lang in LANGS:
        for page in OWN_PAGES:
            path = _page(lang, page)
            if not os.path.isfile(path):
                continue
            for i, m in enumerate(_BLOCK.finditer(_read(path))):
                rel = os.path.relpath(path, ROOT)
                out.append(pytest.param(rel, i, m.group(1), id=f"{rel}#{i}"))
    return out


def test_optimizers_page_has_runnable_blocks():
    for lang in LANGS:
        rel = os.path.relpath(_page(lang, "optimizers.md"), ROOT)
        n = sum(1 for b in _runnable_blocks() if b.values[0] == rel)
        assert n >= 3, f"{rel}: {n} runnable blocks"


@pytest.mark.parametrize("page,index,code", _runnable_blocks())
def test_runnable_block_executes(page, index, code, started):
    res = started.result((page, index))
    assert res.returncode == 0, f"{page} runnable block #{index} failed:\n{code}\n---\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


# --------------------------------------------------------- argument tables
def _table_after(text: str, marker: str) -> dict[str, str]:
    i = text.find(marker)
    assert i >= 0, f"marker {marker!r} not found"
    rows = {}
    started = False
    for line in text[i + len(marker):].splitlines():
        if line.startswith("|"):
            started = True
            m = re.match(r"^\|\s*`([A-Za-z_][A-Za-z0-9_]*)`\s*\|\s*`([^`]*)`\s*\|", line)
            if m:
                rows[m.group(1)] = m.group(2)
        elif started:
            break
    return rows


def _signature_defaults(cls) -> dict:
    sig = inspect.signature(cls.__init__)
    return {n: p.default for i, (n, p) in enumerate(sig.parameters.items()) if i > 0 and n != "params"}


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("cls_name", ["AdaptiveHinaAdamW", "HinaAdamWOptimizer"])
def test_argument_tables_match_the_code(lang, cls_name):
    from library.optimizers.adaptive_hina import AdaptiveHinaAdamW
    from library.optimizers.hina_adamw import HinaAdamWOptimizer

    cls = {"AdaptiveHinaAdamW": AdaptiveHinaAdamW, "HinaAdamWOptimizer": HinaAdamWOptimizer}[cls_name]
    rows = _table_after(_read(_page(lang, "optimizers.md")), f"<!-- args: {cls_name} -->")
    expected = _signature_defaults(cls)
    assert set(rows) == set(expected), f"missing {set(expected) - set(rows)}, extra {set(rows) - set(expected)}"
    for name, default in expected.items():
        cell = rows[name]
        try:
            value = ast.literal_eval(cell)
        except (ValueError, SyntaxError):
            pytest.fail(f"{cls_name}.{name}: default cell {cell!r} is not a Python literal")
        if isinstance(default, float) or isinstance(value, float):
            assert value == pytest.approx(default, rel=1e-12), f"{cls_name}.{name}: docs {cell}, code {default!r}"
        else:
            assert value == default, f"{cls_name}.{name}: docs {cell}, code {default!r}"


# Automagic family (docs/automagic.md): a class's arguments are the union of the tables listed for it
_AUTOMAGIC_TABLES = {
    "Automagic_CameAMP": ["Automagic_CameAMP"],
    "Automagic_CameAMP8bit": ["Automagic_CameAMP", "8-bit extras"],
    "Automagic_CameAMP_COptim": ["Automagic_CameAMP", "COptim extras"],
    "Automagic_CameAMP_COptim8bit": ["Automagic_CameAMP", "COptim extras", "8-bit extras"],
    "RefactoredAutomagicCameAMP": ["RefactoredAutomagicCameAMP", "OptimizerConfig"],
    "OptimizerConfig": ["OptimizerConfig"],
}


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("cls_name", sorted(_AUTOMAGIC_TABLES))
def test_automagic_argument_tables_match_the_code(lang, cls_name):
    from library.optimizers import automagic, automagic_refactored

    cls = getattr(automagic, cls_name, None) or getattr(automagic_refactored, cls_name)
    text = _read(_page(lang, "automagic.md"))
    rows = {}
    for marker in _AUTOMAGIC_TABLES[cls_name]:
        rows.update(_table_after(text, f"<!-- args: {marker} -->"))
    expected = _signature_defaults(cls)
    assert set(rows) == set(expected), f"missing {set(expected) - set(rows)}, extra {set(rows) - set(expected)}"
    for name, default in expected.items():
        value = ast.literal_eval(rows[name])
        if isinstance(default, float) or isinstance(value, float):
            assert value == pytest.approx(default, rel=1e-12), f"{cls_name}.{name}: docs {rows[name]}, code {default!r}"
        else:
            assert value == default, f"{cls_name}.{name}: docs {rows[name]}, code {default!r}"


# --------------------------------------------------------- trainer options
_ALLOWED_OTHER = {"--help", "--sd-scripts", "--lycoris", "--revert", "--check", "--index-url", "--logdir",
                  "--multi_gpu", "--num_processes", "--nproc_per_node", "--cpu",  # launcher options (accelerate, torchrun)
                  "--n", "--w", "--h", "--s", "--l", "--d", "--ss"}  # flags inside a sample prompt line


@pytest.mark.parametrize("lang", LANGS)
def test_trainer_page_names_every_option_and_only_real_ones(lang):
    from library.train_args import setup_parser

    options = {s for sdxl in (False, True) for a in setup_parser(sdxl)._actions
               for s in a.option_strings if s.startswith("--")}  # train_network.py and sdxl_train_network.py
    text = _read(_page(lang, "trainer.md"))
    text = re.sub(r"```text\n.*?```", "", text, flags=re.S)  # quoted error output (contains a typo on purpose)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets (anchors look like options)
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", text))
    unknown = mentioned - options - _ALLOWED_OTHER
    assert not unknown, f"{lang or 'en'} trainer.md mentions options the trainers lack: {sorted(unknown)}"
    missing = options - mentioned - {"--help"}
    assert not missing, f"{lang or 'en'} trainer.md does not document: {sorted(missing)}"


@pytest.mark.parametrize("lang", LANGS)
def test_trainer_page_lists_every_preset(lang):
    text = _read(_page(lang, "trainer.md"))
    presets = sorted(f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".toml"))
    assert presets
    missing = [f for f in presets if f"configs/{f}" not in text]
    assert not missing, f"{lang or 'en'} trainer.md does not list the presets {missing}"


# -------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, letters/digits/space/-/_ kept, spaces to -."""
    import unicodedata

    keep = [ch for ch in heading.strip().lower()
            if ch in " -_" or unicodedata.category(ch)[0] in "LN" or unicodedata.category(ch) == "Mn"]
    return "".join(keep).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


@pytest.mark.parametrize("lang", LANGS)
@pytest.mark.parametrize("page", OWN_PAGES)
def test_relative_links_resolve(lang, page):
    path = _page(lang, page)
    assert os.path.isfile(path), path
    base = os.path.dirname(path)
    own = {os.path.normpath(_page(lg, pg)) for lg in LANGS for pg in OWN_PAGES}
    text = re.sub(r"```.*?```", "", _read(path), flags=re.S)  # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
            continue
        file_part, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(base, file_part)) if file_part else os.path.normpath(path)
        if os.path.basename(full) in PENDING:
            continue
        assert os.path.exists(full), f"{os.path.relpath(path, ROOT)}: broken link {target}"
        if anchor and full in own:
            assert anchor in _anchors(full), f"{os.path.relpath(path, ROOT)}: no heading for the anchor in {target}"
