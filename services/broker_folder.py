"""The embedded broker: kombu's filesystem transport, with each message written whole
before any consumer can see it.

kombu writes a message file in place (open, then write), and its consumers take any file
with the queue's name, unlocked: one that polls between the open and the write reads an
empty message, and the Celery worker (the aggregator, say) dies on the JSON error with the
message lost. Measured: under CPU contention the aggregator of a benchmark run died so.
Here the message is written under a name no consumer takes (`.tmp` after `<queue>.msg`)
and renamed into place, which is atomic on one filesystem.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps

SCHEME = "fedvecfolder"  # the alias services/celery_app.py registers for this transport


class Channel(filesystem.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        tmp = final + ".tmp"  # `_get` takes only names that end in `<queue>.msg`
        try:
            with open(tmp, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class Transport(filesystem.Transport):
    Channel = Channel
