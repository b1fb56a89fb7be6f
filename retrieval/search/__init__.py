"""Queries against an index, and how good the answers are."""
