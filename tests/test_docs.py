"""The README example runs, every code block of every docs page runs, and the site builds strictly.

A page's python blocks run in order, as one script, in a fresh folder, after
``tests/docs_context.py`` (tiny checkpoints under the names the pages use, images, batches,
data files). A page may add hidden context in ``<!-- docs-test setup ... -->`` comments, run in
place; a block that needs what no test machine has (a GPU, a hub download, minutes of
training) is preceded by ``<!-- docs-test skip: <reason> -->`` and listed below.
"""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKEN = re.compile(r"<!-- docs-test setup\n(?P<setup>.*?)-->|(?P<skip><!-- docs-test skip: (?P<reason>[^>]*?) -->\s*)?"
                   r"```python\n(?P<code>.*?)```", re.S)
PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "```python" in p.read_text())


def page_script(page: Path) -> tuple[str, list[str]]:
    """The page's setups and runnable blocks, in order, as one script; and the skip reasons."""
    parts, skipped = ["from docs_context import *  # noqa: F401,F403"], []
    for match in TOKEN.finditer(page.read_text()):
        if match["setup"] is not None:
            parts.append(match["setup"])
        elif match["skip"]:
            skipped.append(match["reason"])
        else:
            parts.append(match["code"])
    return "\n\n".join(parts), skipped


def test_every_docs_page_with_code_is_tested() -> None:
    names = {p.relative_to(ROOT / "docs").as_posix() for p in PAGES}
    assert {"getting-started.md", "guide/report.md", "guide/surgery.md", "guide/causal.md"} <= names
    for page in PAGES:
        script, skipped = page_script(page)
        assert all(len(reason) > 20 for reason in skipped), (page, skipped)  # a reason, not a shrug
        blocks = page.read_text().count("```python")
        assert len(skipped) < blocks or page.name in ("real-models.md", "testbed.md"), page


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT / "docs").as_posix())
def test_docs_page_code_runs(page: Path, tmp_path) -> None:
    script, _ = page_script(page)
    if "shared/data" in script:
        if not SHARED.is_dir():
            pytest.skip(f"{page.name} reads shared/data, which is not at {SHARED}")
        (tmp_path / "shared").symlink_to(SHARED)
    (tmp_path / "page.py").write_text(script)  # nnsight reads trace bodies from a source file
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "VLM_PROBE_CACHE": os.environ.get("VLM_PROBE_CACHE", str(tmp_path / "cache")),
           "MPLBACKEND": "Agg"}
    result = subprocess.run([sys.executable, "page.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]


def test_readme_example_runs(tmp_path) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    script = tmp_path / "readme_example.py"  # nnsight reads trace bodies from a source file
    script.write_text(blocks[0])
    namespace = runpy.run_path(str(script))
    assert len(namespace["vision"]) == namespace["vlm"].n_layers


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e '.[docs]')")
def test_docs_build_strict(tmp_path) -> None:
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_progress_bars_are_widgets_in_jupyter() -> None:
    """tqdm.auto (every vlm_probe progress bar) draws a widget in a notebook of the docs' environment."""
    pytest.importorskip("nbclient", reason="the docs extras are not installed (pip install -e '.[docs]')")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='steps'):\n    pass")])
    NotebookClient(notebook, timeout=120, kernel_name="python3").execute()
    outputs = notebook.cells[0].outputs
    text = " ".join(o.get("text", "") for o in outputs)
    assert "IProgress not found" not in text, "ipywidgets is missing from the docs' environment"
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
