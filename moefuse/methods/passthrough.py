"""Passthrough: one model's tensor, optionally scaled, as mergekit's `passthrough`.

    out = scale * X      (scale 1 by default: X itself, cast to the output dtype)

Computed in fp32. With layer `slices` of different models it stacks their layers into a new
model ("frankenmerge"); one source per slice. No base model is used.
"""

from moefuse.methods.base import BASE_UNUSED, MODEL_SCOPE, MethodSpec, ParamSpec, register

PASSTHROUGH = register(
    MethodSpec(
        name="passthrough",
        family="passthrough",
        params=(ParamSpec("scale", MODEL_SCOPE, 1.0, doc="factor applied to the tensor"),),
        doc=__doc__,
        base=BASE_UNUSED,
        min_models=1,
        max_models=1,
        reference_url="https://github.com/arcee-ai/mergekit#passthrough",
    )
)
