"""Duplicates you can trust: candidates from several signals, every pair verified on its pixels,
three tiers (exact / copy / similar), and the user's decisions remembered (see ``groups``)."""
