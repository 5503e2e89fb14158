"""Sphinx configuration of the optax-amsgrad documentation.

Build (warnings are errors)::

  python -m sphinx -W --keep-going -b html docs docs/_build/html

The site is self-contained: MathJax is served from ``_static`` and no page
loads anything from another host. Intersphinx links to the JAX, Optax and
Python documentation are added only when their inventories can be reached.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

project = "optax-amsgrad"
author = "optax-amsgrad developers"
copyright = "optax-amsgrad developers"
release = importlib.metadata.version("optax-amsgrad")
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_nb",
    "sphinx_copybutton",
    "api_coverage",
    "offline_mathjax",
]

# The notebooks are stored with their outputs and executed by the test suite;
# the site renders the stored outputs.
nb_execution_mode = "off"
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 4
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}

exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path: list[str] = []

autosummary_generate = False
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
python_use_unqualified_type_names = True

html_theme = "sphinx_book_theme"
html_title = f"optax-amsgrad {release}"
html_static_path = ["_static"]
# A page without an icon makes the browser ask for /favicon.ico.
html_favicon = "_static/favicon.svg"
html_theme_options = {
    "repository_url": "https://github.com/optax-amsgrad/optax-amsgrad",
    "use_repository_button": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "path_to_docs": "docs",
    "show_toc_level": 2,
    "navigation_with_keys": False,
}
html_last_updated_fmt = None
# Without it the theme logs a console error on a first visit (no stored mode).
html_context = {"default_mode": "light"}
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True


INVENTORIES = {
    "python": "https://docs.python.org/3",
    "jax": "https://docs.jax.dev/en/latest",
    "optax": "https://optax.readthedocs.io/en/latest",
}


def _reachable(url: str) -> bool:
  """Whether an intersphinx inventory can be fetched now (a short probe)."""
  try:
    with urllib.request.urlopen(f"{url}/objects.inv", timeout=3) as response:
      return bool(response.status == 200)
  except (OSError, ValueError):
    return False


# Links into other projects' documentation only where their inventories can
# be fetched: offline, the build neither waits nor warns.
intersphinx_mapping = {name: (url, None) for name, url in INVENTORIES.items() if _reachable(url)}
if intersphinx_mapping:
  extensions.append("sphinx.ext.intersphinx")


# The notebooks live in notebooks/ (where the tests execute them); the site
# renders copies. A Colab badge is an image from another host, so the copy
# carries it as a plain link.
_BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\((?P<url>[^)]*)\)")


def _copy_notebooks() -> None:
  target = DOCS / "notebooks"
  target.mkdir(exist_ok=True)
  for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
    notebook = json.loads(source.read_text())
    for cell in notebook["cells"]:
      if cell["cell_type"] == "markdown":
        text = "".join(cell["source"])
        cell["source"] = _BADGE.sub(r"[Open in Colab](\g<url>)", text)
    text = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    copy = target / source.name
    if not copy.exists() or copy.read_text() != text:
      copy.write_text(text)
  for stale in target.glob("*.ipynb"):
    if not (ROOT / "notebooks" / stale.name).exists():
      stale.unlink()


_copy_notebooks()

# The modules whose every public name must have an API entry (_ext/api_coverage.py).
api_coverage_modules = [
    "optax_amsgrad",
    "optax_amsgrad.checkpoint",
    "optax_amsgrad.problems",
    "optax_amsgrad.interop",
]
