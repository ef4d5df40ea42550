"""Spherical linear interpolation between the base A and one model B, over the whole tensor.

    a = A / max(||A||, eps), b = B / max(||B||, eps) (a norm <= 1e-8 counts as 1),
    c = clamp(<a, b>, -1, 1), theta = acos(c)
    |c| > 0.9995:  out = (1 - t) A + t B
    otherwise:     out = sin((1 - t) theta) / sin(theta) A + sin(t theta) / sin(theta) B

Norms and the dot product accumulate in fp32 (fp64 on the host for the final sums).
"""

from moefuse.methods.base import GLOBAL_SCOPE, MethodSpec, ParamSpec, register

SLERP = register(
    MethodSpec(
        name="slerp",
        family="slerp",
        params=(ParamSpec("t", GLOBAL_SCOPE, None, doc="interpolation factor, 0 gives the base"),),
        doc=__doc__,
        min_models=1,
        max_models=1,
        reference_url="https://en.wikipedia.org/wiki/Slerp",
    )
)
