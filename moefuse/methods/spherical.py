"""Interpolation on the hypersphere, as mergekit's `nuslerp`, `multislerp` and `karcher`.

All three merge whole tensors (or, for nuslerp without flattening, each vector along one
dimension) as points X_i; with a base B they merge the task vectors X_i - B and add B back.
The result is always a linear combination out = sum_i c_i X_i, whose coefficients follow from
the Gram matrix G_ij = <X_i, X_j> alone: one pass over the inputs for G, one for the sum.

nuslerp (two models, weights w_0, w_1; t = w_1 / (w_0 + w_1), or 0.5 when |w_0 + w_1| < 1e-6):
    cos = clamp(<X_0, X_1> / (max(|X_0|, 1e-7) max(|X_1|, 1e-7)), -1, 1), theta = acos(cos)
    |cos| >= 1 - 2^-22:  out = (1 - t) X_0 + t X_1     (mergekit: its fp32 cos is exactly +-1)
    otherwise:           out = (sin((1 - t) theta) X_0 + sin(t theta) X_1) / sin(theta)
    Over the flattened tensor (nuslerp_flatten, the default), else per vector along the last
    dimension, or along the first with nuslerp_row_wise.

multislerp (weights w_i, divided by their sum with normalize_weights; eps = 1e-8 by default):
    u_i = X_i / (|X_i| + eps),  m = sum_i w_i u_i
    out = (sum_i w_i |X_i|) m / |m|
    The tangent step at the weighted mean m / |m| is zero, since sum_i w_i <u_i, m / |m|> = |m|,
    so the barycentre on the sphere is m / |m|. One model: out = X_0. All X_i zero: out = 0
    (mergekit raises). With |m| < eps otherwise, two models fall back to w_0 X_0 + w_1 X_1;
    more are an error.

karcher (every input weighted 1/N, the base among them; max_iter, tol):
    u_i = X_i / |X_i| for the M inputs with |X_i| > tol; p = normalize(sum_i u_i / M) (u_0 if tiny)
    repeat at most max_iter times:
        theta_i = acos(clamp(<p, u_i>, -1, 1))
        v = (1 / M) sum over the i with theta_i >= tol of theta_i / sin(theta_i) (u_i - <p, u_i> p)
        stop if |v| < tol;  p = normalize(cos(|v|) p + sin(|v|) v / |v|)
    out = (sum_i |X_i| / N) p: the weighted Karcher (Frechet) mean on the sphere, rescaled.
"""

from moefuse.methods.base import (
    BASE_AS_INPUT,
    BASE_OPTIONAL,
    GLOBAL_SCOPE,
    MODEL_SCOPE,
    MethodSpec,
    ParamSpec,
    register,
)

_WEIGHT = ParamSpec("weight", MODEL_SCOPE, None, doc="w_i (required)")

NUSLERP = register(
    MethodSpec(
        name="nuslerp",
        family="sphere",
        params=(
            _WEIGHT,
            ParamSpec("nuslerp_flatten", GLOBAL_SCOPE, True, kind=bool, doc="one angle for the whole tensor"),
            ParamSpec("nuslerp_row_wise", GLOBAL_SCOPE, False, kind=bool,
                      doc="without flattening, vectors along the first dimension instead of the last"),
        ),
        doc=__doc__,
        base=BASE_OPTIONAL,
        min_models=2,
        max_models=2,
        reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    )
)

MULTISLERP = register(
    MethodSpec(
        name="multislerp",
        family="sphere",
        params=(
            _WEIGHT,
            ParamSpec("normalize_weights", GLOBAL_SCOPE, True, kind=bool, doc="divide the weights by their sum"),
            ParamSpec("eps", GLOBAL_SCOPE, 1e-8, minimum=0.0, doc="added to the norms"),
        ),
        doc=__doc__,
        base=BASE_OPTIONAL,
        reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    )
)

KARCHER = register(
    MethodSpec(
        name="karcher",
        family="sphere",
        params=(
            ParamSpec("max_iter", GLOBAL_SCOPE, 10, kind=int, minimum=0, doc="most Riemannian steps"),
            ParamSpec("tol", GLOBAL_SCOPE, 1e-5, minimum=0.0, doc="convergence and zero-norm tolerance"),
        ),
        doc=__doc__,
        base=BASE_AS_INPUT,
        reference_url="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean",
    )
)
