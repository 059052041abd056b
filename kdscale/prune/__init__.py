"""Minitron-style structured pruning: activation importance, homogeneous width/depth cuts."""
