"""Hooks: connections to the services the loop uses."""
