"""The engine: claim, hand off, send, record, finalize, sweep, rate limit, providers."""
