"""The Flax model zoo."""
