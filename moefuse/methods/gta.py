"""The generalized task arithmetic (GTA) family, with mergekit 0.1.5's semantics.

For base B, inputs X_1..X_N, per-model weight w_i and density rho_i:

    d_i   = X_i - B                          (rounded to the input dtype)
    d_i'  = s_i * keep_i * d_i               keep_i: the sparsifier's mask of model i;
                                             s_i: rescale factor (1 without rescale)
    D_i   = w_i * d_i'
    with consensus (TIES sign election, "sum" rule):
        sigma = +1 where sum_i D_i >= 0, else -1
        m_i   = [sign(D_i) == sigma]         (zero entries never agree)
        M     = sum_i m_i D_i,   W = sum_i m_i w_i   (W == 0 -> 1)
    without consensus:
        M     = sum_i D_i,       W = sum_i w_i        (|W| < 1e-8 -> 1)
    M <- M / W if normalize;  out = B + lambda * M

Sparsifiers (n = numel; ranks count from the largest |d_i|, ties broken by lower flat index):
    magnitude    keep ranks [0, k), k = max(1, int(rho * n)); rho = 1 keeps all, rho = 0 none
    breadcrumbs  keep ranks [n - b - t, n - b), t = int(rho * n), g = int(gamma * n),
                 b = max(0, n - t - g)   (drop the top gamma, keep the next rho); rho >= 1 keeps all
    random       keep each entry with probability rho (DARE), counter-based Philox draw
    della        keep with probability p = rho - eps + 2 eps (r - 1) / (m - 1), r the ascending
                 magnitude rank of the entry within its row (dim 1), m the row length
Rescale: "l1" (mergekit) s_i = ||d_i||_1 / ||keep_i d_i||_1 (1 if either is below 1e-7);
"inverse_density" (DARE paper, MergeME) s_i = 1 / rho_i.
MergeME's convention (sum of task vectors) is normalize=false, rescale_mode=inverse_density.
"""

from moefuse.methods.base import GLOBAL_SCOPE, MODEL_SCOPE, MethodSpec, ParamSpec, register

_WEIGHT = ParamSpec("weight", MODEL_SCOPE, 1.0, doc="w_i, multiplies model i's task vector")
_DENSITY = ParamSpec("density", MODEL_SCOPE, 1.0, minimum=0.0, maximum=1.0, doc="fraction kept")
_GAMMA = ParamSpec("gamma", MODEL_SCOPE, 0.01, minimum=0.0, maximum=1.0, doc="top fraction dropped")
_EPSILON = ParamSpec("epsilon", MODEL_SCOPE, 0.15, minimum=0.0, maximum=0.5, doc="DELLA spread")
_LAMBDA = ParamSpec("lambda", GLOBAL_SCOPE, 1.0, doc="scale of the merged task vector")
_RESCALE_MODE = ParamSpec(
    "rescale_mode", GLOBAL_SCOPE, "l1", kind=str, choices=("l1", "inverse_density"),
    doc="how 'rescale' compensates dropped entries",
)
_INT8_MASK = ParamSpec(
    "int8_mask", GLOBAL_SCOPE, False, kind=bool,
    doc="accepted for mergekit compatibility; moefuse never materializes masks",
)
_SEED = ParamSpec("seed", GLOBAL_SCOPE, 0, kind=int, minimum=0, maximum=2**63 - 1, doc="RNG seed")


def _gta(name, sparsifier, consensus, normalize, rescale, url):
    params = [
        _WEIGHT, _DENSITY, _LAMBDA, _INT8_MASK, _RESCALE_MODE,
        ParamSpec("normalize", GLOBAL_SCOPE, normalize, kind=bool, doc="divide by the weight sum"),
        ParamSpec("rescale", GLOBAL_SCOPE, rescale, kind=bool, doc="compensate dropped entries"),
    ]
    if sparsifier == "breadcrumbs":
        params.append(_GAMMA)
    if sparsifier == "della":
        params.append(_EPSILON)
    if sparsifier in ("random", "della"):
        params.append(_SEED)
    return register(
        MethodSpec(
            name=name, family="gta", params=tuple(params), doc=__doc__, sparsifier=sparsifier,
            consensus=consensus, reference_url=url,
        )
    )


TASK_ARITHMETIC = _gta("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089")
TIES = _gta("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708")
DARE_TIES = _gta("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099")
DARE_LINEAR = _gta("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099")
BREADCRUMBS = _gta("breadcrumbs", "breadcrumbs", False, False, False, "https://arxiv.org/abs/2312.06795")
BREADCRUMBS_TIES = _gta(
    "breadcrumbs_ties", "breadcrumbs", True, False, False, "https://arxiv.org/abs/2312.06795"
)
DELLA = _gta("della", "della", True, True, True, "https://arxiv.org/abs/2406.11617")
DELLA_LINEAR = _gta("della_linear", "della", False, False, True, "https://arxiv.org/abs/2406.11617")
