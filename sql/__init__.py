"""Data access: every runtime query (queries.sql) and the small helpers around them."""
