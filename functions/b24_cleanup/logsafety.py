"""Keep secrets out of logs: third-party DEBUG logs, and remote text we copy into our own.

At DEBUG, urllib3 logs every request line, and the OAuth refresh is a GET whose query string
holds the client secret and the refresh token (design §10.7); botocore logs request bodies, and
a PutParameter body is a portal's whole record. Lambda's `ApplicationLogLevel: DEBUG` would send
both to CloudWatch. So these loggers are held at INFO unless someone set them explicitly.

A portal's or the OAuth server's `error_description` is the remote host's own text, and a hostile
or buggy host can echo whatever it was sent — our access token, a refresh token. It is copied into
job reasons, log lines and CLI output, so it goes through :func:`scrub` first.
"""

from __future__ import annotations

import logging
import re

_LOGGERS = ("urllib3", "botocore", "boto3", "s3transfer")


def hold_third_party_loggers() -> None:
    """Raise the secret-logging libraries to INFO where their level was left unset or lower."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:  # NOTSET (0) or DEBUG: inherit nothing below INFO
            logger.setLevel(logging.INFO)


hold_third_party_loggers()


REDACTED = "[redacted]"
# Tokens, refresh tokens, application tokens and client secrets are long runs of letters and digits
# (hex tokens; 50-character secrets). Remote words are short and error codes are split by `_`, so a
# run of 16 or more with a digit in it, or of 24 or more whatever it holds, is taken for a secret.
_RUN = re.compile(r"[A-Za-z0-9]{16,}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def _redact(match: re.Match[str]) -> str:
    run = match.group()
    return REDACTED if len(run) >= 24 or any(c.isdigit() for c in run) else run


def scrub(text: object, limit: int = 200) -> str:
    """Remote text made safe to log: one line, secret-looking runs redacted, at most `limit` characters."""
    if text is None:
        return ""
    value = text if isinstance(text, str) else str(text)
    value = _CONTROL.sub(" ", value[: limit * 4])  # bounded work whatever the remote sent
    return _RUN.sub(_redact, value).strip()[:limit]
