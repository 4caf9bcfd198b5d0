"""Transports: Twisted endpoints (tcp:, unix:, ssl:), our in-memory loopback: and our
mutual-TLS skytls: (see tls.py)."""
