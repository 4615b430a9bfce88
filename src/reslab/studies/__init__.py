"""Experiments that show why residual learning works: `reslab study degradation` and `reslab study units`."""
