"""The embedded folder broker writes each message whole before a consumer can take it:
kombu's own filesystem transport writes in place, and a consumer that polls between the
file's creation and its write reads an empty message and dies (seen in a benchmark run)."""

from __future__ import annotations

import os
from queue import Empty

import pytest
from kombu.exceptions import ChannelError
from kombu.transport import filesystem

from services import broker_folder
from services.celery_app import AGGREGATE_QUEUE, make_app


@pytest.fixture
def app(embedded_settings):
    return make_app(embedded_settings)


def _queue_files(settings) -> list[str]:
    return sorted(os.listdir(settings.broker_folder / "queue"))


def test_the_embedded_broker_is_the_atomic_folder_transport(app, embedded_settings):
    assert app.conf.broker_url == f"{broker_folder.SCHEME}://"
    app.send_task("fedvec.aggregate", args=[{"x": 1}], queue=AGGREGATE_QUEUE)
    (name,) = _queue_files(embedded_settings)
    assert name.endswith(f".{AGGREGATE_QUEUE}.msg")  # whole, renamed into place: no .tmp
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        assert isinstance(channel, broker_folder.Channel)
        message = channel._get(AGGREGATE_QUEUE)
    assert message["headers"]["task"] == "fedvec.aggregate"
    assert _queue_files(embedded_settings) == []


def test_a_message_being_written_is_not_taken(app, embedded_settings):
    """A file in the middle of its write: ours is `….msg.tmp`, which no consumer takes;
    kombu's is the `….msg` itself, which a consumer takes and fails on."""
    queue = embedded_settings.broker_folder / "queue"
    (queue / f"1_a.{AGGREGATE_QUEUE}.msg.tmp").write_bytes(b"")
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        with pytest.raises(Empty):  # the queue holds no whole message yet
            channel._get(AGGREGATE_QUEUE)
        (queue / f"2_b.{AGGREGATE_QUEUE}.msg").write_bytes(b"")  # kombu's half-written file
        with pytest.raises(ValueError):  # JSONDecodeError: what killed the aggregator
            channel._get(AGGREGATE_QUEUE)


def test_a_failed_write_leaves_nothing(app, embedded_settings, monkeypatch):
    def refuse(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(broker_folder.os, "replace", refuse)
    with app.connection_for_write() as conn:
        with pytest.raises(ChannelError, match="Cannot add file"):
            conn.default_channel._put(AGGREGATE_QUEUE, {"x": 1})
    assert _queue_files(embedded_settings) == []
    assert issubclass(broker_folder.Channel, filesystem.Channel)
