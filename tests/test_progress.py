"""Long steps report progress through the qcompiler logger when no terminal shows a bar."""

from __future__ import annotations

import logging

from qcompiler import progress


def test_progress_logs_lines_without_a_terminal(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.0)
    monkeypatch.setattr(progress.logger, "propagate", True)  # a CLI test in this worker may have set it False
    with caplog.at_level(logging.INFO, logger="qcompiler"):
        with progress.progress("quantizing weights (gptq)", 3) as advance:
            for _ in range(3):
                advance()
    # Each record once (caplog may hold a record twice: at the qcompiler logger and through propagation).
    records = {id(record): record for record in caplog.records if record.name == "qcompiler"}.values()
    messages = [record.getMessage() for record in records]
    assert messages[:3] == [f"quantizing weights (gptq): {n}/3 (0 s)" for n in (1, 2, 3)]
    assert messages[-1].startswith("quantizing weights (gptq): done, 3 in")


def test_quiet_console_shows_errors_only(monkeypatch):
    for name in ("handlers", "level", "propagate"):
        monkeypatch.setattr(progress.logger, name, getattr(progress.logger, name))
    progress.configure_console(quiet=True)
    assert progress.logger.level == logging.ERROR and not progress.logger.propagate
    progress.configure_console(quiet=False)
    assert progress.logger.level == logging.INFO
