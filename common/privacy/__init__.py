"""Differential privacy for what leaves a silo: the configuration, the mechanism (clip and
Gaussian noise of the shared adapter's update) and the accountant (epsilon after each round)."""
