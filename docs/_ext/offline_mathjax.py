"""Serves MathJax from the site's own ``_static/mathjax``.

Sphinx loads MathJax from a CDN by default; this points ``mathjax_path`` at
the copy of MathJax 3 that the ``sphinx-mathjax-offline`` package ships (in
the ``docs`` extra), so that no page loads anything from another host.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config
from sphinx.errors import ConfigError

DISTRIBUTION = "sphinx-mathjax-offline"


def static_folder() -> Path:
  """The folder holding ``mathjax/``, inside the installed distribution."""
  try:
    dist = importlib.metadata.distribution(DISTRIBUTION)
  except importlib.metadata.PackageNotFoundError as error:
    raise ConfigError(
        f"the documentation serves MathJax from the {DISTRIBUTION} package, which is not "
        'installed: pip install -e ".[docs]"') from error
  folder = Path(str(dist.locate_file("sphinx-mathjax-offline/static")))
  if not (folder / "mathjax" / "tex-chtml.js").is_file():
    raise ConfigError(f"no mathjax/tex-chtml.js in {folder}")
  return folder


def configure(app: Sphinx, config: Config) -> None:
  config.html_static_path = [*config.html_static_path, str(static_folder())]
  config.mathjax_path = "mathjax/tex-chtml.js"


def setup(app: Sphinx) -> dict[str, Any]:
  app.connect("config-inited", configure)
  return {"parallel_read_safe": True, "parallel_write_safe": True}
