"""Benchmarks: training/prediction/load timing, chaos (kill and resume), comparisons across backbones and methods, the bench report."""
