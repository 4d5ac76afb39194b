"""The nightly sweep's fan-out: one `sweep` job per stored portal (design §5 "Sweep").

EventBridge Scheduler invokes this with the target's `Input`, `{"scheduled_time":
"<aws.scheduler.scheduled-time>"}`, or with `{}` on a manual invoke. The run's scheduled time goes
into every job's deduplication id, so a retried run (same scheduled time, within SQS's five-minute
deduplication window) does not queue a portal twice.

The declared set is checked first: a broken config must never reach the workers' unbind step, and
an invalid set enqueues nothing at all (design §3). Portals are streamed from DescribeParameters
page by page and sent ten at a time, so memory stays constant in the number of portals.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .. import runtime
from ..errors import EnqueueFailedError, InvalidDeclaredSetError
from ..planner import DeclaredSet
from ..sharding import tonight
from .observability import logger, publish

if TYPE_CHECKING:
    from aws_lambda_powertools.utilities.typing import LambdaContext

ACTION = "scheduler"
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def scheduled_time_of(event: object, now: datetime | None = None) -> str:
    """The run's scheduled time as `YYYY-MM-DDTHH:MM:SSZ` (UTC).

    Normalised so that the same instant always yields the same deduplication ids, however the
    Input spelled it. Without one (a manual invoke) it is the current minute: two manual invokes
    within the same minute are then one run.
    """
    if event is None:
        event = {}
    if not isinstance(event, dict):
        raise ValueError("the scheduler event must be a JSON object")
    value = event.get("scheduled_time")
    if value is None or value == "":
        moment = (now or datetime.now(UTC)).astimezone(UTC).replace(second=0, microsecond=0)
        return moment.strftime(TIME_FORMAT)
    if not isinstance(value, str):
        raise ValueError("scheduled_time must be an ISO-8601 string")
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"scheduled_time is not an ISO-8601 time: {value[:64]!r}") from None
    if moment.tzinfo is None:  # the scheduler's placeholder always carries Z; naive means UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


@logger.inject_lambda_context(log_event=False, clear_state=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Check the declared set, then fan out one sweep job per stored portal."""
    scheduled_time = scheduled_time_of(event)
    logger.append_keys(scheduled_time=scheduled_time)
    store = runtime.store()

    try:
        DeclaredSet.parse(store.declared_set_text())
    except InvalidDeclaredSetError as exc:
        # Never half-used: no portal is queued, so no worker can unbind anything on its strength.
        logger.error("declared handler set is invalid: no sweep job enqueued", extra={"reason": str(exc)})
        publish(ACTION, {"DeclaredSetInvalid": 1})
        return {"enqueued": 0, "scheduled_time": scheduled_time, "declared_set_invalid": True, "reason": str(exc)}

    queue = runtime.queue()
    try:
        # One night in B24_SWEEP_EVERY_NIGHTS per portal (design §4), so a night's refreshes fit SSM's writes.
        every = runtime.settings().sweep_every_nights
        enqueued = queue.send_sweeps(tonight(store.iter_member_ids(), scheduled_time, every), scheduled_time)
    except EnqueueFailedError as exc:
        # Report what did get queued, then fail the run: it is retried, and SQS deduplicates.
        publish(ACTION, {"PortalsEnqueued": exc.sent})
        logger.error("sweep fan-out failed", extra={"enqueued": exc.sent, "reason": str(exc)})
        raise
    publish(ACTION, {"PortalsEnqueued": enqueued})
    logger.info("sweep jobs enqueued", extra={"enqueued": enqueued})
    return {"enqueued": enqueued, "scheduled_time": scheduled_time}
