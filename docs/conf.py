"""Sphinx configuration: ``sphinx-build -W docs OUTDIR`` (pip install -e '.[docs]')."""

from importlib.metadata import version as _version

project = "pyramid_powerhose"
author = "pyramid_powerhose contributors"
release = _version("pyramid_powerhose")
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinxarg.ext",  # sphinx-argparse: the commands' pages, from their parsers
]

# settings.rst is generated (python -m pyramid_powerhose.settings --rst) and
# included by configuration.rst rather than built as a page of its own.
exclude_patterns = ["_build", "settings.rst"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
html_static_path = []
