"""Text in a failed TLS handshake of a client of the cloud -> its metric label: the entries both
of the cloud's TLS listeners (edges: `tunnel_server`; proxy clients: `proxy_tls`) share. Each
listener's table puts its own entries around these (`tls_contexts.failure_label` takes the first
key found)."""

CLIENT_CERTIFICATE = (  # the client sent no certificate, or one of a CA we do not trust
    ("certificate required", "no_certificate"),
    ("peer did not return", "no_certificate"),
    ("unknown ca", "unknown_ca"),
)
NOT_TLS = (  # the client spoke something else (plain HTTP, an old TLS record version)
    ("http request", "not_tls"),
    ("wrong version", "not_tls"),
)
