"""predict's default precision follows what export.json records the job trained in (fp16 → fp32). (That
export.json records the run's precision: tests/integration/test_pretrained_profiles.py, a bf16 run.)"""
from __future__ import annotations

import pytest

from trainer.predict.inference import default_precision


@pytest.mark.parametrize("manifest, precision", [
    ({"quantization": "nf4", "precision": "bf16"}, "nf4"),
    ({"quantization": "none", "precision": "bf16"}, "bf16"),
    ({"quantization": "none", "precision": "fp16"}, "fp32"),  # predict has no fp16 path
    ({"quantization": "none", "precision": "fp32"}, "fp32"),
    ({"format": 1}, "fp32"),
])
def test_predict_defaults_to_what_the_job_trained_in(manifest, precision):
    assert default_precision(manifest) == precision
