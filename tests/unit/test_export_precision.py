"""export.json records the precision the run computed in, and predict's default follows it (fp16 → fp32)."""
from __future__ import annotations

import pytest

from trainer.predict.inference import default_precision
from trainer.train.export import trained_precision


@pytest.mark.parametrize("mixed, recorded", [("no", "fp32"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_the_trained_precision_is_recorded_as_it_ran(mixed, recorded):
    from accelerate.utils import PrecisionType

    assert trained_precision(mixed) == recorded
    assert trained_precision(PrecisionType(mixed)) == recorded  # what Accelerator.mixed_precision holds


@pytest.mark.parametrize("manifest, precision", [
    ({"quantization": "nf4", "precision": "bf16"}, "nf4"),
    ({"quantization": "none", "precision": "bf16"}, "bf16"),
    ({"quantization": "none", "precision": "fp16"}, "fp32"),  # predict has no fp16 path
    ({"quantization": "none", "precision": "fp32"}, "fp32"),
    ({"format": 1}, "fp32"),
])
def test_predict_defaults_to_what_the_job_trained_in(manifest, precision):
    assert default_precision(manifest) == precision
