"""Transports: Twisted endpoints (tcp:, unix:, ssl:, and our in-memory loopback:)."""
