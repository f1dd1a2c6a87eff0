"""Inputs of training: user profiles and their embeddings, Sage-format pairs, the toy world."""
