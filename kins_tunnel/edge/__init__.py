"""tunnel-edge: dials every cloud replica, keeps the tunnels up, forwards streams to local targets."""
