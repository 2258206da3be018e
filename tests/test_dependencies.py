"""normjax needs JAX alone; Flax, Equinox, Optax and chex are optional, and a missing one is named with its extra.

Each check runs in a fresh Python process in which the optional packages are unimportable (a ``sys.meta_path``
finder refuses them, as if they were not installed), so the result does not depend on what this environment has.
"""

import subprocess
import sys
import textwrap

OPTIONAL = ("flax", "optax", "chex", "equinox", "orbax")

BLOCK = f"""
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""


def run_without_optional_packages(code: str) -> str:
    """Runs ``code`` in a fresh process that cannot import the optional packages; returns its output."""
    result = subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_core_works_with_jax_alone():
    output = run_without_optional_packages(
        """
        import jax.numpy as jnp
        import normjax as nj

        x = jnp.arange(12.0).reshape(4, 3)
        y, state = nj.batch_norm(x, nj.init_batch_norm_state(3), training=True, momentum=0.0)
        assert jnp.allclose(state.mean, x.mean(0)) and jnp.allclose(jnp.mean(y, 0), 0.0, atol=1e-6)
        assert jnp.allclose(nj.moments(x, 0).var, x.var(0))
        for y in (nj.layer_norm(x), nj.rms_norm(x), nj.group_norm(x[None], num_groups=3), nj.instance_norm(x[None])):
            assert bool(jnp.all(jnp.isfinite(y)))
        mask = nj.weight_decay_mask({"Dense_0": {"kernel": x}, "BatchNorm_0": {"scale": x[0]}})
        assert mask == {"Dense_0": {"kernel": True}, "BatchNorm_0": {"scale": False}}
        print("ok")
        """
    )
    assert output.strip() == "ok"


def test_importing_normjax_imports_no_optional_package():
    # Here the optional packages are installed: normjax must still not import them until they are used.
    code = f"import sys, normjax; print(sorted(m for m in sys.modules if m.partition('.')[0] in {OPTIONAL!r}))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_layers_say_which_extra_installs_their_library():
    output = run_without_optional_packages(
        """
        for module in ("normjax.linen", "normjax.nnx", "normjax.equinox"):
            try:
                __import__(module)
            except ImportError as error:
                print(error)
            else:
                print(module, "imported")
        """
    )
    assert output.splitlines() == [
        "normjax.linen needs Flax, which is not installed. Install it with `pip install 'normjax[flax]'` "
        "(or `pip install flax`).",
        "normjax.nnx needs Flax, which is not installed. Install it with `pip install 'normjax[flax]'` "
        "(or `pip install flax`).",
        "normjax.equinox needs Equinox, which is not installed. Install it with `pip install 'normjax[equinox]'` "
        "(or `pip install equinox`).",
    ]


def test_the_flax_utilities_say_which_extra_installs_flax():
    output = run_without_optional_packages(
        """
        import normjax as nj

        calls = {
            "freeze_batch_norm": lambda: nj.freeze_batch_norm().__enter__(),
            "freeze_batch_norm_nnx": lambda: nj.freeze_batch_norm_nnx(object()),
            "find_norm_modules": lambda: nj.find_norm_modules(object()),
            "precise_batch_stats": lambda: nj.precise_batch_stats(
                lambda v, b: None, {"batch_stats": {"bn": {"mean": 0.0, "var": 1.0}}}, [[1.0]]
            ),
        }
        for name, call in calls.items():
            try:
                call()
            except ImportError as error:
                print(name, "|", error)
            else:
                print(name, "| no error")
        """
    )
    for line in output.splitlines():
        name, message = line.split(" | ")
        assert message == (
            f"normjax.{name} needs Flax, which is not installed. Install it with `pip install 'normjax[flax]'` "
            "(or `pip install flax`)."
        )
    assert len(output.splitlines()) == 4


def test_an_installed_but_broken_package_keeps_its_own_error():
    # Only a missing package is reported as a missing extra; a failure inside Flax's own imports is not hidden.
    output = run_without_optional_packages(
        """
        import sys, types

        sys.meta_path.pop(0)
        flax = types.ModuleType("flax")
        flax.__path__ = []
        sys.modules["flax"] = flax  # a flax without its submodules
        try:
            import normjax.linen
        except ModuleNotFoundError as error:
            print(error.name)
        """
    )
    assert output.strip() == "flax.linen"
