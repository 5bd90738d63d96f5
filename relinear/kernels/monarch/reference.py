"""Plain-torch `monarch_linear`: a Monarch pair is a BTT pair (see relinear.approx.monarch), so Monarch runs
the BTT forms: blocks1 [k, k*t, p] is core1, blocks2 [k, s, t*k] is core2. A separate op lets Monarch get
a kernel specialised to its shapes and keeps it visible as its own node in graphs and reports.
"""

from relinear.kernels.btt.reference import btt_linear_cpu as monarch_linear_cpu
from relinear.kernels.btt.reference import btt_linear_fake as monarch_linear_fake
from relinear.kernels.btt.reference import btt_linear_reference as monarch_linear_reference

__all__ = ["monarch_linear_cpu", "monarch_linear_fake", "monarch_linear_reference"]
