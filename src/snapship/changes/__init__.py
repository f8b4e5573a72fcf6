"""Change sources: which byte ranges of a volume changed since its last backup."""
