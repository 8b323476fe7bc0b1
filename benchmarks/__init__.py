"""Side-by-side benchmarks: kins_tunnel vs OpenSSH ``ssh -R`` vs direct TCP (``python -m benchmarks.run``)."""
