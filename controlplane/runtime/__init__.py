"""Wiring: what starts processes and servers and connects the pure parts to them."""
