"""Clustering over Ray actors."""
