"""Training: schedules, optimizer, loop."""
