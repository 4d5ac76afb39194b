"""b24-cleanup: serverless cleanup of Bitrix24 event handlers.

The core (client, token store, planner, engine) knows nothing about Lambda; the thin Lambda
handlers live in :mod:`b24_cleanup.handlers`.
"""

# The one place the version is set: pyproject.toml reads it from here (`dynamic = ["version"]`), and
# it is the package's own attribute rather than installed metadata because Lambda ships no dist-info.
__version__ = "0.1.0"
