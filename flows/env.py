"""Environment defaults that must be in place before Prefect, Ray or GX are imported.

`set_env_defaults` only fills variables that are unset, so a user's or CI's own setting
always wins. Reasons (measured on the 2-core development machine):

- ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60``: with no ``PREFECT_API_URL`` a
  temporary local server starts on the first flow call (~8-12 s); Prefect's default
  20 s is tight on a busy machine.
- ``PREFECT_SERVER_ANALYTICS_ENABLED=false``, ``RAY_USAGE_STATS_ENABLED=0``,
  ``GX_ANALYTICS_ENABLED=false``: no telemetry (and no network errors without internet).
"""

from __future__ import annotations

import os

ENV_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "GX_ANALYTICS_ENABLED": "false",
}


def set_env_defaults() -> None:
    """Set every `ENV_DEFAULTS` variable that is not already set."""
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
