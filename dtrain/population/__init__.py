"""Populations: many members of one model trained at once, vectorised along a leading member axis."""
