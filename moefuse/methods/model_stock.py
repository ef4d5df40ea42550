"""Model Stock (arXiv 2403.19522): interpolate the models' average towards the base.

    d_i = X_i - B,  cos = mean over pairs i < j of clamp(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)
    t = N cos / (1 + (N - 1) cos)   (t = 0 where |1 + (N - 1) cos| < 1e-6)
    out = t * mean_i X_i + (1 - t) * B

With filter_wise, cos and t are computed per filter (each vector along the last dimension)
instead of over the whole tensor.
Needs at least two models besides the base.
"""

from moefuse.methods.base import GLOBAL_SCOPE, MethodSpec, ParamSpec, register

MODEL_STOCK = register(
    MethodSpec(
        name="model_stock",
        family="model_stock",
        params=(ParamSpec("filter_wise", GLOBAL_SCOPE, False, kind=bool, doc="one t per filter (last dimension)"),),
        doc=__doc__,
        min_models=2,
        reference_url="https://arxiv.org/abs/2403.19522",
    )
)
