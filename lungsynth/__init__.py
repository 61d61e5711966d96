"""lungsynth."""
