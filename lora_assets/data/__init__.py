"""Data layer: source schemas, the user store, synthetic users. Imports neither torch nor dagster."""
