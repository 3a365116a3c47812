"""The suite's conftest turns a skip for a missing module into a failed run; other skips stay skips."""

from __future__ import annotations

import pytest

INNER_TESTS = """
import pytest

def test_passes():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_gpu_only():
    pass
"""


@pytest.fixture
def inner(pytester):
    """A pytest run (in this process) of a temp dir under the suite's own conftest hooks."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403  the suite's hooks and fixtures\n")
    return lambda *args: pytester.runpytest("-q", "-p", "no:cacheprovider", *args)


@pytest.mark.parametrize("missing", [
    "def test_needs_it():\n    pytest.importorskip('sae4scfm_no_such_module')\n",  # inside a test
    "pytest.importorskip('sae4scfm_no_such_module')\n",  # at import of the test module
    "@pytest.mark.skipif(True, reason='desc not installed: pip install --no-deps desc==2.1.1')\n"
    "def test_needs_desc():\n    pass\n",
], ids=["importorskip-in-test", "importorskip-in-module", "skipif-install-hint"])
def test_a_skip_for_a_missing_module_fails_the_run(pytester, inner, missing):
    pytester.makepyfile(test_inner=INNER_TESTS, test_missing="import pytest\n" + missing)
    result = inner()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(["*skipped for a missing module*", "*test_missing*"])
    assert "test_gpu_only" not in result.stdout.str().split("skipped for a missing module")[1]


def test_other_skips_pass(pytester, inner):
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = inner("-rs")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["*needs a CUDA device*", "*1 passed, 1 skipped*"])
    assert "missing module" not in result.stdout.str()
