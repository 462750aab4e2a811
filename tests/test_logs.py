"""Logging: every library logger names itself (``logger=NAME`` in each line) and obeys the level set later."""
from __future__ import annotations

import json

import structlog

from specmq.logs import configure_logging


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_library_loggers_carry_their_name(capsys):
    import broker.broker
    import workers.link

    configure_logging("info", json_logs=True)
    try:
        broker.broker.log.info("test.event", n=1)
        workers.link.log.bind(worker="w").info("test.bound")
        structlog.get_logger("simulator").info("test.named", logger="explicit")
        lines = _lines(capsys.readouterr().err)
    finally:
        structlog.reset_defaults()
    assert [(r["event"], r["logger"]) for r in lines] == [
        ("test.event", "broker"), ("test.bound", "worker.link"), ("test.named", "explicit")]
    assert lines[1]["worker"] == "w" and lines[0]["n"] == 1


def test_a_logger_made_before_configuration_obeys_the_level_set_after(capsys):
    log = structlog.get_logger("early")  # as a module-level logger is, at import
    configure_logging("warning", json_logs=True)
    try:
        log.info("dropped")
        log.warning("kept")
        lines = _lines(capsys.readouterr().err)
    finally:
        structlog.reset_defaults()
    assert [(r["event"], r["logger"], r["level"]) for r in lines] == [("kept", "early", "warning")]
