"""Linear (weighted average) merge, "model soups" (arXiv 2203.05482).

    out = sum_i w_i X_i / sum_i w_i      (normalize, the default; sum_i w_i == 0 is an error)
    out = sum_i w_i X_i                  (normalize: false)

Computed in fp32. No base model is used.
"""

from moefuse.methods.base import BASE_UNUSED, GLOBAL_SCOPE, MODEL_SCOPE, MethodSpec, ParamSpec, register

LINEAR = register(
    MethodSpec(
        name="linear",
        family="linear",
        params=(
            ParamSpec("weight", MODEL_SCOPE, 1.0, doc="w_i"),
            ParamSpec("normalize", GLOBAL_SCOPE, True, kind=bool, doc="divide by the weight sum"),
        ),
        doc=__doc__,
        base=BASE_UNUSED,
        reference_url="https://arxiv.org/abs/2203.05482",
    )
)
