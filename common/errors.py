"""The one exception type for mistakes a user can fix (bad config values, missing data)."""


class ConfigError(ValueError):
    """A user mistake. The runner prints ``str(err)`` as one line and exits with status 2.

    Messages name the offending key and, where there is a closed set, the allowed values.
    """
