"""Message composition both the API and the worker use: pure code, no I/O."""
