"""Expert-based architectures for feature-vector inputs (any expert module allowed).

* :class:`~polytask.archs.experts.shared_bottom.SharedBottom` (``shared_bottom``): the
  shared-bottom baseline of MMoE (Ma et al., KDD 2018).
* :class:`~polytask.archs.experts.moe.OMoE` (``omoe``) and
  :class:`~polytask.archs.experts.moe.MMoE` (``mmoe``): one gate for all tasks, one per task.
* :class:`~polytask.archs.experts.ple.CGC` (``cgc``) and
  :class:`~polytask.archs.experts.ple.PLE` (``ple``): task-specific and shared experts,
  one and several extraction levels (Tang et al., RecSys 2020).
* :class:`~polytask.archs.experts.dselect_k.DSelectK` (``dselect_k``): per-task gates that
  select at most k experts (Hazimeh et al., NeurIPS 2021).
"""

from polytask.archs.experts.dselect_k import DSelectK, DSelectKGate, smooth_step
from polytask.archs.experts.moe import MMoE, OMoE
from polytask.archs.experts.ple import CGC, PLE, ExtractionLayer
from polytask.archs.experts.shared_bottom import SharedBottom

__all__ = [
    "CGC",
    "PLE",
    "DSelectK",
    "DSelectKGate",
    "ExtractionLayer",
    "MMoE",
    "OMoE",
    "SharedBottom",
    "smooth_step",
]
