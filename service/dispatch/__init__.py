"""Leader-only reminder dispatch: fenced claims and outcome writes, the dispatch loop, the rate limiter."""
