"""SCE (select, calculate, erase; arXiv 2408.07990), as mergekit's `sce`.

For base B and inputs X_1..X_N, task vectors d_i = X_i - B and k = select_topk:
    select:    v = var_i(d_i) entry by entry (population variance over the models);
               for k < 1 keep the int(k * count(v != 0)) entries of largest v (ties by lower
               flat index), d_i <- d_i * keep; k <= 0 keeps none, k >= 1 all
    calculate: s_i = mean(d_i^2) over the tensor, w_i = s_i / sum_j s_j
               (w_i = 1 / N when |sum_j s_j| < 1e-6)
    erase:     sigma = +1 where sum_i d_i >= 0, else -1;  m_i = [sign(d_i) == sigma]
    out = B + sum_i m_i w_i d_i / max(sum_i m_i w_i, 1e-6)
Computed in fp32.
"""

from moefuse.methods.base import GLOBAL_SCOPE, MethodSpec, ParamSpec, register

SCE = register(
    MethodSpec(
        name="sce",
        family="sce",
        params=(
            ParamSpec("select_topk", GLOBAL_SCOPE, 1.0, doc="fraction of entries kept, by variance across models"),
            ParamSpec("int8_mask", GLOBAL_SCOPE, False, kind=bool,
                      doc="accepted for mergekit compatibility; moefuse never materializes masks"),
        ),
        doc=__doc__,
        reference_url="https://arxiv.org/abs/2408.07990",
    )
)
