"""reminders: two-way SMS appointment reminders that cut no-shows."""

__version__ = "0.1.0"
