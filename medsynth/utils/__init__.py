"""Small shared helpers: atomic output, hashing, seeding."""
