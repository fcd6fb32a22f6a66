"""Evaluation and benchmarking: one fixed, versioned protocol for every stage."""
