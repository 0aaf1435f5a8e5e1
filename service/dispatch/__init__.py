"""Leader-only reminder dispatch: the dispatch loop, calls through providers without idempotency
(`stamped`), the speech sweep, the rate limiter. Its writes go through the ledger."""
