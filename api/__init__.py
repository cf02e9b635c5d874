"""The HTTP API for the dashboard: a Starlette app that meets the workers only in Postgres."""
