"""Pub/Sub: the publisher's replay plan (pure) and its sending."""
