"""Prediction: load an export, slide windows over a scene, write the rasters; TerraTorch-file prediction."""
