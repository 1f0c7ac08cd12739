"""Workarounds for bugs of the libraries megamft builds on, each named after what it fixes."""
