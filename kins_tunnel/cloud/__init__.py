"""tunnel-cloud: the edge listener (mutual TLS), the registry of edges, the CONNECT front end."""
