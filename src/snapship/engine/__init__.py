"""Engines: backup, restore and verify, written against `Repository` and `devices` only."""
