"""The README's quick start and Pyramid example run as written.

The code is read from README.rst, not copied here, so a README that
drifts from the code fails.  In the sections below, a ``.. file: PATH``
comment before a ``.. code-block::`` makes that block the file PATH;
``pycon`` blocks are a session, run with ``python -m doctest``.  Everything
runs for real: a cluster under Circus, a Pyramid app loaded from the
README's ini file, on the default endpoints of a private temp directory
(``XDG_RUNTIME_DIR``).
"""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import webtest
from pyramid.interfaces import IRoutesMapper
from paste.deploy.loadwsgi import APP, loadcontext

from pyramid_powerhose.plugin import get_powerhose

from .conftest import REPO, all_gone, mentioning

README = os.path.join(REPO, "README.rst")
QUICK_START = "Quick start"
PYRAMID = "In a Pyramid application"


def sections(text):
    """README.rst's top-level sections: {title: body}."""
    lines = text.splitlines()
    found, title = {}, None
    for line, underline in zip(lines, lines[1:] + [""]):
        if line.strip() and re.fullmatch(r"=+", underline) and len(underline) >= len(line):
            title = line.strip()
            found[title] = []
        elif title is not None:
            found[title].append(line)
    return {name: "\n".join(body) for name, body in found.items()}


def code_blocks(section):
    """``(language, file or None, code)`` for each code block of a section."""
    blocks, file, lines = [], None, section.splitlines()
    for i, line in enumerate(lines):
        marker = re.fullmatch(r"\.\. file: (\S+)", line)
        if marker:
            file = marker.group(1)
            continue
        directive = re.fullmatch(r"\.\. code-block:: (\S+)", line)
        if not directive:
            continue
        body = []
        for text in lines[i + 1:]:
            if text.strip() and not text.startswith(" "):
                break
            body.append(text)
        blocks.append((directive.group(1), file, textwrap.dedent("\n".join(body)).strip() + "\n"))
        file = None
    return blocks


def readme_section(title):
    with open(README) as f:
        found = sections(f.read())
    assert title in found, f"README.rst has no section {title!r}"
    blocks = code_blocks(found[title])
    assert blocks, f"README.rst's {title!r} has no code blocks"
    return blocks


def write_files(blocks, directory):
    """Write the blocks marked ``.. file:`` under ``directory``; their paths."""
    paths = []
    for _language, file, code in blocks:
        if file is None:
            continue
        path = os.path.join(directory, file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(code)
        paths.append(path)
    assert paths, "no '.. file:' block"
    return paths


@pytest.fixture
def private_runtime_dir(run_dir, monkeypatch):
    """The default endpoints, in this test's own directory; nothing left running."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", run_dir)
    yield run_dir
    assert all_gone(mentioning(run_dir)), "processes of the README's cluster are left"


def test_quick_start_runs_as_written(private_runtime_dir, procs):
    run_dir = private_runtime_dir
    blocks = readme_section(QUICK_START)
    write_files(blocks, run_dir)
    sessions = [code for language, file, code in blocks if language == "pycon" and file is None]
    assert any(">>> " in code for code in sessions), "the quick start has no pycon session"
    session = os.path.join(run_dir, "session.txt")
    with open(session, "w") as f:
        f.write("\n".join(sessions))
    proc = procs.start([sys.executable, "-m", "doctest", session], "doctest",
                       env={"XDG_RUNTIME_DIR": run_dir}, cwd=run_dir)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pass
    with open(proc.log_path, errors="replace") as f:
        output = f.read()
    assert proc.returncode == 0, output


def test_pyramid_example_runs_as_written(private_runtime_dir, monkeypatch):
    run_dir = private_runtime_dir
    blocks = readme_section(PYRAMID)
    files = write_files(blocks, run_dir)
    inis = [path for path in files if path.endswith(".ini")]
    assert len(inis) == 1, "the Pyramid example has no ini file, or several"
    modules = {os.path.relpath(path, run_dir).split(os.sep)[0].removesuffix(".py")
               for path in files if path.endswith(".py")}
    monkeypatch.syspath_prepend(run_dir)  # the README's modules, for use = call:...
    try:
        # With the README's settings, the app starts a cluster and the
        # views' jobs run there.
        app = load_app(inis[0])
        try:
            powerhose = get_powerhose(app.registry)
            assert powerhose.cluster is not None and powerhose.cluster.running
            offloaded = post_to_every_route(app)
        finally:
            get_powerhose(app.registry).close()
        # The same app with the testing include runs the same jobs in-process.
        app = load_app(inis[0], **{"pyramid.includes": "pyramid_powerhose.testing"})
        in_process = post_to_every_route(app)
    finally:
        for name in list(sys.modules):
            if name.split(".")[0] in modules:
                del sys.modules[name]
    assert offloaded == in_process


def load_app(ini, **settings):
    """The ini file's app, as pserve loads it, with extra ``settings``."""
    context = loadcontext(APP, "config:" + ini)
    context.local_conf.update(settings)
    return context.create()


def post_to_every_route(app):
    """POST a body to each route of ``app``: {pattern: (status, JSON body)}."""
    test_app = webtest.TestApp(app)
    routes = app.registry.getUtility(IRoutesMapper).get_routes()
    assert routes, "the README's app has no route"
    answers = {}
    for route in routes:
        response = test_app.post(route.pattern, b"some request body")
        answers[route.pattern] = (response.status_int, response.json)
    return answers
