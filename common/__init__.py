"""What ``tasks``, ``schedules`` and ``runner`` share without depending on each other: the user-error
type (:mod:`adaptune.common.errors`) and the typed-config toolkit (:mod:`adaptune.common.schema`)."""
