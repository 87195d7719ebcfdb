"""Persistence: every SQL statement, the migrations runner and the embedded PostgreSQL."""
