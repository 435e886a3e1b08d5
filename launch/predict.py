"""Predict a scene with a trained job: `python launch/predict.py --job runs/X --input scene.tif --out pred.tif`.

Sliding windows with overlap and blending, GeoTIFF out with the input's georeferencing; `--help` lists the options.
"""
from trainer.cli import run_launcher

if __name__ == "__main__":
    run_launcher("predict")
