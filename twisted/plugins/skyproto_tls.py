"""skyproto's ``skytls:`` endpoint plugin (mutual TLS against the cluster CA): objects only,
the code lives in skyproto/transports/tls.py and imports pyOpenSSL only when used."""

from skyproto.transports.tls import SkyTLSClientParser, SkyTLSServerParser

skytls_server = SkyTLSServerParser()
skytls_client = SkyTLSClientParser()
