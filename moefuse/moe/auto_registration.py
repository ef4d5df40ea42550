"""Register the `moefuse_moe` and `moefuse_hetero` classes with transformers' `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`, without importing transformers when moefuse is imported.

`import moefuse` calls `install()`: the Auto modules transformers has already imported get the
classes at once; the others get them right after they are first imported (an import hook on
`transformers.models.auto.configuration_auto` and `...modeling_auto`). So
`AutoModelForCausalLM.from_pretrained(<moefuse_moe folder>)` works after `import moefuse`, in either
import order, and `import moefuse` stays as light as before.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Callable

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODEL_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    """AutoConfig: "moefuse_moe" -> MoefuseMoeConfig, "moefuse_hetero" -> MoefuseHeteroConfig."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from moefuse.moe import configuration_hetero
    from moefuse.moe.configuration_moefuse import MODEL_TYPE, MoefuseMoeConfig

    AutoConfig.register(MODEL_TYPE, MoefuseMoeConfig, exist_ok=True)
    AutoConfig.register(configuration_hetero.MODEL_TYPE, configuration_hetero.MoefuseHeteroConfig, exist_ok=True)


MODELING_MODULES = ("moefuse.moe.modeling_moefuse", "moefuse.moe.modeling_hetero")


def _initializing(name: str) -> bool:
    """Whether module `name` is being imported right now (it is in sys.modules, half run)."""
    spec = getattr(sys.modules.get(name), "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


def register_models(finishing: str = "") -> None:
    """AutoModel and AutoModelForCausalLM: MoefuseMoeConfig -> MoefuseMoeModel / MoefuseMoeForCausalLM,
    MoefuseHeteroConfig -> MoefuseHeteroModel / MoefuseHeteroForCausalLM.

    When one of moefuse's modeling modules is itself what imported transformers' Auto module, its
    classes do not exist yet: registration then waits for `register_when_loaded`, which each
    modeling module calls as its last statement (naming itself as `finishing`: its classes exist)."""
    if any(_initializing(name) for name in MODELING_MODULES if name != finishing):
        return
    register_config()
    from transformers.models.auto.modeling_auto import AutoModel, AutoModelForCausalLM

    from moefuse.moe.modeling_hetero import MoefuseHeteroConfig, MoefuseHeteroForCausalLM, MoefuseHeteroModel
    from moefuse.moe.modeling_moefuse import MoefuseMoeConfig, MoefuseMoeForCausalLM, MoefuseMoeModel

    AutoModel.register(MoefuseMoeConfig, MoefuseMoeModel, exist_ok=True)
    AutoModelForCausalLM.register(MoefuseMoeConfig, MoefuseMoeForCausalLM, exist_ok=True)
    AutoModel.register(MoefuseHeteroConfig, MoefuseHeteroModel, exist_ok=True)
    AutoModelForCausalLM.register(MoefuseHeteroConfig, MoefuseHeteroForCausalLM, exist_ok=True)


REGISTRATIONS = {CONFIG_AUTO: register_config, MODEL_AUTO: register_models}


def register_when_loaded(module_name: str) -> None:
    """Register the model classes if transformers' Auto modeling module is already loaded (called
    as the last statement of each modeling module, `module_name`; otherwise the import hook
    registers them later)."""
    if MODEL_AUTO in sys.modules:
        register_models(finishing=module_name)


class _LoaderThenRegister(importlib.abc.Loader):
    """Runs a module's own loader, then a registration."""

    def __init__(self, loader: importlib.abc.Loader, register: Callable[[], None]):
        self._loader = loader
        self._register = register

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._register()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _AutoModuleFinder(importlib.abc.MetaPathFinder):
    """Finds transformers' Auto modules as the path finder does and wraps their loaders."""

    def find_spec(self, fullname, path, target=None):
        register = REGISTRATIONS.get(fullname)
        if register is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderThenRegister(spec.loader, register)
        return spec


def install() -> None:
    """Register now with the Auto modules already imported, and hook the others (once)."""
    for name, register in REGISTRATIONS.items():
        if name in sys.modules:
            register()
    if not any(isinstance(finder, _AutoModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoModuleFinder())
