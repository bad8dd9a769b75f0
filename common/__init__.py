"""What ``tasks``, ``schedules`` and ``runner`` share without depending on each other: the user-error
type (:mod:`common.errors`) and the typed-config toolkit (:mod:`common.schema`)."""
