"""kins_tunnel: a reverse tunnel that lets a cloud control plane reach edge K3s clusters behind NAT."""

__version__ = "0.1.0"
