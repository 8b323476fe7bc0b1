"""Test doubles for the demo and the tests; never imported by the tunnel itself.

`k3s_standin` answers just enough of the K3s API for real kubectl. This subpackage is left out
of the container image (see the Dockerfile), so nothing in the product may depend on it.
"""
