"""The user's drive: publication of adapter versions and device sync. Imports no dagster."""
