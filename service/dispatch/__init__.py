"""Leader-only reminder dispatch and the reminder policy."""
