"""Regularised sharing: loss terms that tie the tasks' parameters softly.

Each regulariser returns a scalar the trainer adds (times its strength) to the balanced
task losses: tensor trace norms (:func:`trace_norm`, :func:`generalized_trace_norm`), the
MRN tensor normal prior (:class:`MRN`), Deep-AMTFL's asymmetric transfer
(:class:`DeepAMTFL`) and SRDML's saliency similarity (:class:`SRDML`). DMTRL instead builds
the sharing into the layer (:class:`DMTRLLinear`, :class:`TensorFactorisedWeights`).
"""

from polytask.regularizers.deep_amtfl import DeepAMTFL
from polytask.regularizers.dmtrl import DMTRLLinear, TensorFactorisedWeights
from polytask.regularizers.gttn import flattenings, generalized_trace_norm
from polytask.regularizers.mrn import MRN
from polytask.regularizers.srdml import SRDML, saliency
from polytask.regularizers.trace_norm import nuclear_norm, trace_norm, trace_norm_terms

__all__ = [
    "MRN",
    "SRDML",
    "DMTRLLinear",
    "DeepAMTFL",
    "TensorFactorisedWeights",
    "flattenings",
    "generalized_trace_norm",
    "nuclear_norm",
    "saliency",
    "trace_norm",
    "trace_norm_terms",
]
