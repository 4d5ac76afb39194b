"""The sample events in events/ are what they say (they feed `sam local invoke -e` and the docs)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from b24_cleanup.payload import InstallPost, parse_event_body

EVENTS = Path(__file__).resolve().parents[2] / "events"


@pytest.mark.parametrize(
    ("name", "event"), [("install_form.json", "ONAPPINSTALL"), ("update_form.json", "ONAPPUPDATE")]
)
def test_install_and_update_bodies_are_registration_bodies(name: str, event: str) -> None:
    sample = json.loads((EVENTS / name).read_text())
    assert sample["isBase64Encoded"] is True and sample["requestContext"]["http"]["method"] == "POST"
    body = base64.b64decode(sample["body"])
    assert int(sample["headers"]["content-length"]) == len(body)
    payload = parse_event_body(body, sample["headers"]["content-type"])
    post = InstallPost.from_payload(payload)
    assert post.event == event
    assert post.member_id == "a223c6b3710f85df22e9377d6c4f7553"
