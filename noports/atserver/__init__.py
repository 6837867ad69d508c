"""Embedded root directory and atServer (SQLite store, TLS, local PKI)."""
