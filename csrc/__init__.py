"""CUDA sources, installed as megamft._csrc so the just-in-time build finds them."""
