"""pytest fixtures and hooks of the end-to-end suite; the helpers are in the chatgw_e2e
package beside this file (its docstring lists them).

* ``make_gateway`` -- factory of started ``Gateway``s, every one killed at teardown.
* ``_hard_timeout`` (autouse) -- fails any test that runs longer than
  ``TEST_HARD_TIMEOUT_S``.
* ``pytest_runtest_makereport`` -- keeps each phase's report on the test item, so
  ``make_gateway`` knows whether the test failed.
"""

from __future__ import annotations

import signal

import pytest

# Before the package is imported: its asserts (check_fanout, ...) explain themselves as a
# test module's do.
pytest.register_assert_rewrite("chatgw_e2e")

from chatgw_e2e.gateway import Gateway  # noqa: E402

# Every test gets at most this long (SIGALRM), so a hung gateway can never hang CI.
TEST_HARD_TIMEOUT_S = 90


class _HardTimeout(BaseException):
    pass


@pytest.fixture(autouse=True)
def _hard_timeout():
    """Fail (not hang) any test that runs longer than TEST_HARD_TIMEOUT_S."""

    def on_alarm(signum, frame):
        raise _HardTimeout(f"test exceeded {TEST_HARD_TIMEOUT_S}s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, TEST_HARD_TIMEOUT_S)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def make_gateway(request):
    """Factory: ``gw = make_gateway(workers=2, env={...}, wait_ready=True, ...)``.

    Keyword arguments go to ``Gateway(...)`` except ``wait_ready`` and
    ``ready_timeout``, which go to ``start``. Every gateway is killed (by pid) at
    teardown; its temp dir is removed unless the test failed (then its path and log
    tail are printed).
    """
    made: list[Gateway] = []

    def factory(wait_ready: bool = True, ready_timeout: float = 20.0, **kw) -> Gateway:
        gw = Gateway(**kw)
        made.append(gw)
        gw.start(wait_ready=wait_ready, timeout=ready_timeout)
        return gw

    yield factory

    rep = getattr(request.node, "rep_call", None)
    failed = rep is None or rep.failed
    for gw in made:
        gw.kill_everything()
        if failed:
            print(f"\n[e2e] gateway state dir kept: {gw.tmp}\n[e2e] log tail:\n{gw.log_text()[-2000:]}")
        else:
            gw.cleanup()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
