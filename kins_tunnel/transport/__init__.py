"""Transport: sessions over non-blocking TLS sockets, tunnel streams as trio streams, the relay."""
