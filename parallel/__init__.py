"""Device meshes, logical-axis sharding rules and backend-specific workarounds."""
