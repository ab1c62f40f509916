"""Reports from the sites, where untrusted input enters the server: an update's or an
evaluation's report is checked against what the server recorded (the request, the client)
and against the client's key before anything is written. A refused report changes nothing:
no row, no object, not even a processed-event mark (so a forged copy cannot shadow the
genuine report); it is logged with its client and update ids and counted in
fedvec_reports_refused_total by reason.

Past this point the database is the record: rows are trusted, and the sha256 they hold
vouch for the objects (aggregator/loader.py checks them on every read)."""

from __future__ import annotations

import logging

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from schema.events import EvaluationReported, Report, UpdateFailed, UpdateReported
from schema.models import Client, Evaluation, Update, UpdateStatus
from services import adapter_store as ads
from services import metrics
from services.db import session_scope
from services.object_store import ObjectNotFound, ObjectStore, ObjectTooLarge
from services.settings import Settings
from services.signing import hmac_verify, verify

log = logging.getLogger(__name__)

# outcomes of a refused report (event outcome and fedvec_reports_refused_total reason)
REFUSED = ("unknown-update", "unknown-client", "mismatch", "unsigned", "bad-signature")


class Refused(Exception):
    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome


class Intake:
    def __init__(self, settings: Settings, store: ObjectStore, db_url: str) -> None:
        self.settings = settings
        self.store = store
        self.db_url = db_url
        # client id -> (public key, HMAC key) as the database holds them
        self._client_keys: dict[int, tuple[str | None, str | None]] = {}

    # --- updates ------------------------------------------------------------------------
    def record_update(
        self, s: Session, row: Update, event: UpdateReported | UpdateFailed
    ) -> Update:
        """The `requested` row as the worker's report makes it (`stored`, or `rejected` when
        its sketch is unusable) or its failure (`failed`), within the caller's transaction;
        Refused, with nothing changed, when the report is not the request's or not the
        client's.

        A stored update gets a new row id: ids order updates as they were stored, which the
        asynchronous rules read (a client's latest update; one stored after a newer one was
        aggregated is superseded), as they did when workers wrote the rows."""
        if event.round_id != row.round_id:
            raise Refused("mismatch", f"round {event.round_id}, requested in {row.round_id}")
        if isinstance(event, UpdateFailed):
            row.status = UpdateStatus.FAILED
            row.reason = event.reason[:2000] or "the worker gave up (no reason given)"
            return row
        if event.base_version != row.base_version:
            raise Refused(
                "mismatch", f"trained from version {event.base_version}, not {row.base_version}"
            )
        self.check_signature(event)
        adapter_key, tv_key = ads.update_keys(row.client_id, row.uid)
        stored = Update(
            uid=row.uid,
            client_id=row.client_id,
            round_id=row.round_id,
            base_version=row.base_version,
            status=UpdateStatus.STORED,
            adapter_key=adapter_key,
            adapter_sha256=event.adapter_sha256,
            task_vector_key=tv_key,
            task_vector_sha256=event.task_vector_sha256,
            task_vector_norm=event.task_vector_norm,
            signature=event.signature,
            num_examples=event.num_examples,
            steps=event.steps,
            train_loss=event.train_loss,
            duration_s=event.duration_s,
            worker=event.worker[:256],
        )
        if event.sketch_sha256 is not None:
            try:
                stored.sketch = self._sketch(row, event.sketch_sha256)
            except (ValueError, ObjectNotFound) as exc:
                # signed by the client: its own broken update, kept with the reason
                stored.status = UpdateStatus.REJECTED
                stored.reason = f"sketch: {exc}"[:2000]
                metrics.UPDATES_REJECTED.labels(reason="invalid_file").inc()
                log.warning("client=%s update=%s rejected: %s", row.client_id, row.uid, exc)
        s.delete(row)
        s.flush()  # the uid is free again
        s.add(stored)
        s.flush()
        return stored

    def _sketch(self, row: Update, expected: str) -> bytes:
        size = 4 * self.settings.sketch_dim
        try:
            data = self.store.get_bounded(ads.sketch_key(row.client_id, row.uid), size)
        except ObjectTooLarge:
            raise ValueError(f"over {size} bytes (FEDVEC_SKETCH_DIM)") from None
        if len(data) != size:
            raise ValueError(f"{len(data)} bytes, expected {size} (FEDVEC_SKETCH_DIM)")
        if ads.sha256(data) != expected:
            raise ValueError("sha256 does not match the report")
        return bytes(data)

    # --- evaluations ---------------------------------------------------------------------
    def record_evaluation(self, event: EvaluationReported) -> str:
        """An evaluation row from the worker's report: "evaluated", "evaluation-failed", or
        "duplicate" (this evaluation is recorded already); Refused as for updates."""
        with session_scope(self.db_url) as s:
            client = s.get(Client, event.client_id)
            if client is None or client.removed_at is not None:
                raise Refused(
                    "unknown-client", f"evaluation of unknown or removed client {event.client_id}"
                )
        self.check_signature(event)
        try:
            with session_scope(self.db_url) as s:
                s.add(
                    Evaluation(
                        uid=event.evaluation_uid,
                        client_id=event.client_id,
                        adapter_version=event.adapter_version,
                        metric=event.metric or "accuracy",
                        accuracy=event.accuracy,
                        balanced_accuracy=event.balanced_accuracy,
                        loss=event.loss,
                        num_examples=event.num_examples,
                        reason=event.reason,
                    )
                )
        except IntegrityError:
            return "duplicate"
        if event.reason is not None:
            log.warning(
                "client=%s evaluation=%s failed: %s",
                event.client_id,
                event.evaluation_uid,
                event.reason,
            )
            return "evaluation-failed"
        return "evaluated"

    # --- signatures ----------------------------------------------------------------------
    def check_signature(self, report: Report) -> None:
        """Signed with the client's private key (services/signing.py). A client not yet
        rotated to a key pair is verified by HMAC while FEDVEC_ACCEPT_HMAC allows; clients
        enrolled before signing existed have neither, and their reports are taken unsigned."""
        client_id = report.client_id  # type: ignore[attr-defined]
        try:
            self._verify(report, *self._keys(client_id))
        except Refused:
            # the key may have been rotated since it was cached: check once more with the
            # database's key before refusing
            self._client_keys.pop(client_id, None)
            self._verify(report, *self._keys(client_id))

    def _keys(self, client_id: int) -> tuple[str | None, str | None]:
        if client_id in self._client_keys:
            return self._client_keys[client_id]
        with session_scope(self.db_url) as s:
            client = s.get(Client, client_id)
            keys = (client.public_key, client.secret_hash) if client else (None, None)
        if keys != (None, None):  # a client without a key is read again: it may get one
            self._client_keys[client_id] = keys
        return keys

    def _verify(self, report: Report, public: str | None, hmac_key: str | None) -> None:
        client_id = report.client_id  # type: ignore[attr-defined]
        if public is None and hmac_key is None:
            return
        signature = report.signature  # type: ignore[attr-defined]
        if not signature:
            raise Refused("unsigned", f"not signed (client {client_id} signs its reports)")
        message = report.signed_bytes()
        if public is not None:
            ok = verify(public, signature, message)
        elif not self.settings.accept_hmac:
            raise Refused(
                "bad-signature",
                f"client {client_id} signs with HMAC, which FEDVEC_ACCEPT_HMAC=false refuses: "
                "give it a key pair with `fedvec rotate-key`",
            )
        else:
            ok = hmac_verify(hmac_key, signature, message)
        if not ok:
            raise Refused(
                "bad-signature",
                f"signature does not match: not signed with client {client_id}'s key, or "
                "changed after signing",
            )
