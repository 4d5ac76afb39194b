"""Keep secrets out of third-party DEBUG logs.

At DEBUG, urllib3 logs every request line, and the OAuth refresh is a GET whose query string
holds the client secret and the refresh token (design §10.7); botocore logs request bodies, and
a PutParameter body is a portal's whole record. Lambda's `ApplicationLogLevel: DEBUG` would send
both to CloudWatch. So these loggers are held at INFO unless someone set them explicitly.
"""

from __future__ import annotations

import logging

_LOGGERS = ("urllib3", "botocore", "boto3", "s3transfer")


def hold_third_party_loggers() -> None:
    """Raise the secret-logging libraries to INFO where their level was left unset or lower."""
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:  # NOTSET (0) or DEBUG: inherit nothing below INFO
            logger.setLevel(logging.INFO)


hold_third_party_loggers()
