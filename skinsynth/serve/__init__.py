"""The HTTP endpoint: Ray Serve in front of the trained classifier."""
