"""b24-cleanup: serverless cleanup of Bitrix24 event handlers.

The core (client, token store, planner, engine) knows nothing about Lambda; the thin Lambda
handlers live in :mod:`b24_cleanup.handlers`.
"""

__version__ = "0.1.0"
