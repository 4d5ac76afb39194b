"""Module-level Logger and Metrics shared by the three handlers (design §6).

Every metric carries one dimension, `action`, and never a per-portal one: per-portal detail goes
to structured log lines.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME") or "b24-cleanup"
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or "B24Cleanup"

logger = Logger(service=SERVICE)
# service="" keeps Powertools from adding a `service` dimension: the dimension set is exactly
# [action], which is what the template's alarms and dashboard select on.
metrics = Metrics(namespace=NAMESPACE, service="")

# The core logs through the standard library (it knows nothing about Lambda); give its loggers
# the same structured JSON output.
logging.getLogger("b24_cleanup").setLevel(logger.log_level)
for _handler in logger.handlers:
    logging.getLogger("b24_cleanup").addHandler(_handler)
logging.getLogger("b24_cleanup").propagate = False

# An invocation that did nothing (e.g. an empty batch) has nothing to publish; that is not news.
warnings.filterwarnings("ignore", "No application metrics to publish*")


def publish(action: str, values: Mapping[str, int]) -> None:
    """Emit design §6 counters as one EMF blob under `action` (zero values are left out, unless all are).

    Flushed at once because one worker batch may hold uninstall and sweep jobs, and a blob can
    carry only one value of the `action` dimension.
    """
    nonzero = {name: value for name, value in values.items() if value}
    # An invocation that did work but counted nothing (a scheduler run over no portals) still
    # reports its zeros: a missing datapoint and "nothing happened" look alike on a dashboard.
    values = nonzero or dict(values)
    if not values:
        return
    metrics.add_dimension(name="action", value=action)
    for name, value in values.items():
        metrics.add_metric(name=name, unit=MetricUnit.Count, value=value)
    metrics.flush_metrics()
