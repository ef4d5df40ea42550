"""NearSwap, as mergekit's `nearswap`: take the model's value where it is near the base's.

For base A, one model B and threshold t > 0, entry by entry:
    w   = clamp(t / max(|A - B|, 1e-6), 0, 1)
    out = w B + (1 - w) A
Entries closer than t are swapped for the model's; farther ones move towards it by t / |A - B|.
Computed in fp32.
"""

from moefuse.methods.base import GLOBAL_SCOPE, MethodSpec, ParamSpec, register

NEARSWAP = register(
    MethodSpec(
        name="nearswap",
        family="nearswap",
        params=(ParamSpec("t", GLOBAL_SCOPE, None, doc="distance below which the model's value is taken"),),
        doc=__doc__,
        min_models=1,
        max_models=1,
        reference_url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    )
)
