"""Triggers: wait for external jobs in the triggerer, holding no worker slot."""
