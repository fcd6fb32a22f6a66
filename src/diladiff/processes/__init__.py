"""Diffusion processes as pure tensor math (no networks)."""
