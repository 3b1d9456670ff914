"""What the fuzz suites share: hypothesis settings and a log of outcomes and bugs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

# No shrinking: a failure is collected (not raised) so one run lists every distinct bug, and
# derandomize makes it reproducible as it stands.
FUZZ = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])


def message_problem(err: Exception, name: str) -> str | None:
    """Why the error's message is not acceptable (None when it is): empty, or a line not naming the file."""
    msg = str(err)
    if not msg:
        return "empty message"
    bad = [line for line in msg.splitlines() if name not in line]
    return f"a line does not name {name}: {bad[0]!r}" if bad else None


def describe_bug(err: BaseException) -> str:
    """One line identifying an unexpected exception: its type, where it was raised, its message."""
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    where = f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"
    return f"{type(err).__name__} at {where}: {str(err)[:160]!r}"


class FuzzLog:
    """Outcomes per input kind (``tally``) and distinct bugs with a sample input (``bugs``)."""

    settings = FUZZ

    def __init__(self):
        self.tally: Counter = Counter()
        self.bugs: dict[str, str] = {}

    def attempt(self, call, error: type[Exception], name: str, label: str, sample: str, ok: str = "loaded"):
        """Run ``call()``. The property: it succeeds (tallied ``ok``; returns its result), or raises
        ``error`` with a message whose every line names ``name`` (tallied ``refused``). Anything
        else is a bug. Returns None unless it succeeded."""
        try:
            result = call()
        except error as e:
            if problem := message_problem(e, name):
                self.bugs.setdefault(f"{error.__name__}: {problem}", sample)
            self.tally[f"{label}: refused"] += 1
        except Exception as e:  # noqa: BLE001 - the property: nothing else may escape
            self.bugs.setdefault(describe_bug(e), sample)
            self.tally[f"{label}: unhandled"] += 1
        else:
            self.tally[f"{label}: {ok}"] += 1
            return result
        return None

    def report(self) -> str:
        return "\n".join(f"{bug}\n  on: {sample[:300]!r}" for bug, sample in self.bugs.items())


@pytest.fixture
def fuzz_log() -> FuzzLog:
    return FuzzLog()
