"""Explaining a Swin Transformer from the real model: the walk of one image (``walk``) and the paper's
figures (``figures``); ``scripts/explain.py`` is their command line."""
