"""The campaign's checkers (bench/campaign.py, one per rule of design §7) find what they look for.

The campaign test in test_reliability.py shows that every invariant holds on a real run; this shows that a
broken one would be reported: each checker gets evidence in which its rule is broken.
"""

from __future__ import annotations

import sys

import pytest
from fixtures.aws import ROOT

from b24_cleanup.ops.sandbox import Sandbox

if str(ROOT) not in sys.path:  # bench/ lives beside functions/, not inside the package
    sys.path.insert(0, str(ROOT))

from bench import campaign
from bench.campaign import CampaignConfig, CampaignReport, Case, Evidence

pytestmark = pytest.mark.box(declared=campaign.DECLARED)
ORPHAN = {"event": "ONCRMLEADADD", "handler": campaign.OLD}


def _case(box: Sandbox, kind: str, *, orphan: bool = False, name: str = "") -> Case:
    rows = [{"event": "ONCRMLEADADD", "handler": f"{campaign.APP}/events"}] + ([ORPHAN] if orphan else [])
    seeded = box.add_portal(f"{name or kind.replace('_', '-')}.bitrix24.test", handlers=rows)
    case = Case(kind, seeded.member_id, seeded.portal.domain, seeded.portal, seeded.installation.application_token)
    keys = campaign._rows(case, box)
    case.declared_before = {k for k in keys if campaign._is_declared(k)}
    return case


@pytest.fixture
def evidence(box: Sandbox) -> Evidence:
    report = CampaignReport(CampaignConfig(portals=1, spoofs=0))
    return Evidence(box, [], [], campaign._Capture(), report)


def _verdict(checker: campaign.Checker, ev: Evidence) -> list[str]:
    return list(checker(ev))


def test_every_checker_is_registered_once() -> None:
    names = [checker.__name__ for checker in campaign.CHECKS]
    assert len(names) == len(set(names))
    assert names[-1] == "stored_chains_still_refresh"  # last: it spends the stored refresh tokens


def test_a_clean_run_breaks_nothing(box: Sandbox, evidence: Evidence) -> None:
    tidy = _case(box, "tidy")
    evidence.cases.append(tidy)
    evidence.jobs.append({"member_id": tidy.member_id, "action": "sweep", "outcome": "clean"})
    evidence.final[(tidy.member_id, "sweep")] = "clean"
    evidence.totals = {"sweep": {"PortalsProcessed": 1}}

    assert [m for checker in campaign.CHECKS for m in checker(evidence)] == []
    assert evidence.report.tokens_verified == evidence.report.tokens_expected == 1
    assert evidence.report.declared_rows == 1


def test_a_job_ending_otherwise_or_dropped_is_reported(box: Sandbox, evidence: Evidence) -> None:
    tidy, doomed = _case(box, "tidy"), _case(box, "doomed", orphan=True)
    evidence.cases += [tidy, doomed]
    evidence.final[(tidy.member_id, "sweep")] = "cleaned"  # tidy must end `clean`; doomed's job is missing

    broken = _verdict(campaign.jobs_end_as_their_portal_was_built, evidence)

    assert broken == [
        f"tidy portal {tidy.member_id}: sweep ended cleaned, expected clean",
        f"doomed portal {doomed.member_id}: sweep job has no outcome and is not in the DLQ (silently dropped)",
    ]


def test_a_lost_declared_row_and_an_orphan_left_when_done_are_reported(box: Sandbox, evidence: Evidence) -> None:
    case = _case(box, "orphans", orphan=True)
    case.declared_before.add(("ONCRMDEALADD", "", "offline:"))  # declared before, not there now
    evidence.cases.append(case)
    evidence.final[(case.member_id, "sweep")] = "cleaned"

    assert len(_verdict(campaign.declared_handlers_stay_bound, evidence)) == 1
    assert evidence.report.declared_lost == 1
    assert _verdict(campaign.done_means_no_orphan_left, evidence) == [
        f"orphans portal {case.member_id} reported done with orphans left: "
        f"[('ONCRMLEADADD', '{campaign.OLD}', 'user:0')]"
    ]


def test_a_deleted_live_record_is_reported(box: Sandbox, evidence: Evidence) -> None:
    case = _case(box, "tidy")
    evidence.cases.append(case)
    box.store.client.delete_parameter(Name=box.store.portal_name(case.member_id))

    assert _verdict(campaign.live_records_stay_whole, evidence) == [f"tidy portal {case.member_id}: record deleted"]


def test_a_secret_in_the_output_is_reported(box: Sandbox, evidence: Evidence) -> None:
    case = _case(box, "tidy")
    evidence.capture.write(f"refreshed with {box.record(case.member_id).refresh_token}")  # type: ignore[union-attr]

    assert _verdict(campaign.no_secret_in_output, evidence) == ["1 secret(s) found in the output or logs"]
    assert evidence.report.secrets_leaked == 1


def test_a_stored_token_that_no_longer_refreshes_is_reported(box: Sandbox, evidence: Evidence) -> None:
    case = _case(box, "tidy")
    evidence.cases.append(case)
    box.emulator.uninstall(case.portal, box.app)  # the chain is dead

    broken = _verdict(campaign.stored_chains_still_refresh, evidence)

    assert len(broken) == 1 and broken[0].startswith(f"tidy portal {case.member_id}: stored refresh token refused")
    assert (evidence.report.tokens_verified, evidence.report.tokens_expected) == (0, 1)


def test_a_forged_uninstall_that_wiped_a_live_portal_is_reported(box: Sandbox, evidence: Evidence) -> None:
    kept, wiped = _case(box, "leaked"), _case(box, "leaked", name="leaked-wiped")
    evidence.cases += [kept, wiped]
    evidence.final[(kept.member_id, "uninstall")] = "skipped"
    evidence.final[(wiped.member_id, "uninstall")] = "cleaned"  # what main before issue 13 did
    evidence.totals = {"uninstall": {"UninstallUnconfirmed": 1}}
    box.store.client.delete_parameter(Name=box.store.portal_name(wiped.member_id))

    broken = _verdict(campaign.forged_uninstalls_wipe_nothing, evidence)

    assert broken == [
        f"leaked portal {wiped.member_id}: wiped by a forged uninstall (record deleted or replaced; "
        "uninstall job ended cleaned)"
    ]
    assert (evidence.report.wiped_by_forged, evidence.report.forged_live) == (1, 2)
    assert any(line.startswith("live portals wiped by forged uninstalls: 1") for line in evidence.report.check_lines)


def test_a_checker_adds_its_line_to_the_summary(evidence: Evidence) -> None:
    evidence.report.check_lines.append("pairs lost under throttling: 0")
    lines = evidence.report.format().splitlines()
    assert lines[lines.index("pairs lost under throttling: 0") - 1].startswith("orphans left on portals")
