"""The one shape of a configuration error: `SettingError` names the environment variable.

Every component that refuses a value it was configured with raises it (the provider packages'
settings checks, the dispatcher's and the election's configuration, through `service.components`),
so that `reminders serve` and `uvicorn service.app:app` stop with one line naming the variable.
"""

from __future__ import annotations

__all__ = ["SettingError"]


class SettingError(ValueError):
    """A bad setting: `variable` is the environment variable, `message` what is wrong with it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable, self.message = variable, message
