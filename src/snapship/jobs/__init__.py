"""Declared jobs: the jobs file, running its jobs, and their systemd units."""
