"""A pytest plugin (registered by conftest): the run fails when a test is skipped for a missing module.

CI installs every test dependency, so such a skip means a broken environment, not an
optional feature. A skip counts as one when its reason says so: ``pytest.importorskip``
("could not import …"), "No module named", "not installed" or an install hint ("pip install …").
Other skips (e.g. "needs a GPU") stay skips. The skips are listed in a summary section and
the exit status becomes 1.
"""

from __future__ import annotations

import re

import pytest

MISSING_MODULE = re.compile(r"could not import|no module named|not installed|pip install", re.IGNORECASE)


class MissingModuleSkips:
    def __init__(self) -> None:
        self.found: list[str] = []

    def _note(self, report) -> None:
        if report.skipped and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            if MISSING_MODULE.search(reason):
                self.found.append(f"{report.nodeid or report.fspath}: {reason}")

    def pytest_collectreport(self, report) -> None:  # module-level importorskip
        self._note(report)

    def pytest_runtest_logreport(self, report) -> None:
        self._note(report)

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.found:
            terminalreporter.section("skipped for a missing module: install the test dependencies "
                                     "(README 'Run the tests')", red=True)
            for line in self.found:
                terminalreporter.line(line)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session) -> None:
        if self.found and session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
