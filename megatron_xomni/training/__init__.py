"""Training: schedules, optimizer, trainer loop."""
