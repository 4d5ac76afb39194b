"""Sustained SSM write throttling (design §5 step 3, §7): a nightly sweep of portals whose tokens are all due.

SSM is the quota-faithful one (ops/quota.py: moto behind real SSM's write quota, ThrottlingException on the
real wire); a neighbouring application keeps spending the account's write quota all along; the real
scheduler and worker handlers run with Lambda contexts whose time runs down. Every rotated pair must be
stored (the emulator's OAuth server still refreshes every stored refresh token) and no invocation may run
past its timeout. The campaign prints the same run (bench/campaign.py: run_throttled_sweep).
"""

from __future__ import annotations

import sys

from fixtures.aws import ROOT

if str(ROOT) not in sys.path:  # bench/ lives beside functions/, not inside the package
    sys.path.insert(0, str(ROOT))

from bench.campaign import ThrottleConfig, run_throttled_sweep


def test_sustained_ssm_throttling_loses_no_rotated_pair_and_no_invocation_overruns() -> None:
    report = run_throttled_sweep(ThrottleConfig(portals=100))
    summary = "\n".join(report.lines())

    assert report.writes_throttled > 20, summary  # SSM really did throttle, all along
    assert report.refreshed >= 100, summary
    assert report.lost == 0, summary  # every stored refresh token still refreshes at the OAuth server
    assert report.over_timeout == 0 and report.max_invocation < report.config.timeout, summary
    assert report.in_dlq == 0 and report.final["clean"] == 100, summary
    assert "pairs lost under throttling: 0" in summary
