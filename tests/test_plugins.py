import re
import subprocess
import sys
import types

import pytest

import measureflow
from measureflow import PluginError, UnknownPluginError
from measureflow.plugins import Registry, reload_registry


def test_builtins_are_registered_with_their_owner():
    registry = measureflow.get_registry()
    assert {"euler", "heun", "midpoint", "rk4", "dopri5", "euler_maruyama"} <= set(registry.names("integrators"))
    assert {"linear", "ornstein_uhlenbeck"} <= set(registry.names("fields"))
    assert {"h5md", "memory"} <= set(registry.names("writers"))
    assert registry.owner_of("fields", "linear") == "measureflow_plugins.linear"


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(UnknownPluginError, match="registered fields: .*linear"):
        measureflow.field("no-such-field")


def test_duplicate_name_names_both_owners():
    registry = Registry()
    registry._owner = ("pkg_a", "1")
    registry.add_field("twin", object)
    registry._owner = ("pkg_b", "2")
    with pytest.raises(PluginError, match="'pkg_a' and again by 'pkg_b'"):
        registry.add_field("twin", object)


def test_in_process_plugin_object_registers_like_a_package():
    module = types.ModuleType("inline_plugin")

    @measureflow.hookimpl
    def measureflow_register_fields(registry):
        registry.add_field("inline_zero", measureflow.Field)

    module.measureflow_register_fields = measureflow_register_fields
    try:
        registry = reload_registry(extra_plugins=[module])
        assert registry.owner_of("fields", "inline_zero") == "inline_plugin"
    finally:
        reload_registry()


def test_example_third_party_package_is_found():
    """The package in examples/ is installed by the README's install command."""
    registry = measureflow.get_registry()
    assert "spiral" in registry.names("fields"), "pip install ./examples/measureflow-spiral first"
    entry = registry.entry("fields", "spiral")
    assert entry.owner == "measureflow-spiral" and entry.version == "0.2.0"
    out = subprocess.run([sys.executable, "-m", "measureflow", "plugins"], capture_output=True, text=True, check=True)
    assert any(line.split()[:3] == ["spiral", "measureflow-spiral", "0.2.0"] for line in out.stdout.splitlines())


def _fake_distribution(root, name, module_source):
    """A minimal installed distribution (dist-info with an entry point) on a private path."""
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[measureflow]\n{name} = {name}_module\n")
    (root / f"{name}_module.py").write_text(module_source)


def _plugins_command(path, strict):
    import os

    # Keep the caller's PYTHONPATH after the fake distribution, so the child imports the code under test.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(path), os.environ.get("PYTHONPATH")) if p))
    env.pop("MEASUREFLOW_STRICT_PLUGINS", None)
    if strict:
        env["MEASUREFLOW_STRICT_PLUGINS"] = "1"
    return subprocess.run([sys.executable, "-m", "measureflow", "plugins"], capture_output=True, text=True, env=env)


def test_broken_plugin_is_reported_by_name_and_skipped(tmp_path):
    _fake_distribution(tmp_path, "brokenplug", "raise ImportError('missing dependency frobnicate')\n")
    run = _plugins_command(tmp_path, strict=False)
    assert run.returncode == 0, run.stderr
    assert "brokenplug" in run.stderr and "frobnicate" in run.stderr
    assert "linear" in run.stdout  # everything else still loads
    assert "brokenplug" in run.stdout  # listed under "failed to load"
    strict = _plugins_command(tmp_path, strict=True)
    assert strict.returncode != 0 and "brokenplug" in strict.stderr


def test_duplicate_from_a_package_names_both_owners(tmp_path):
    source = (
        "import measureflow\n"
        "@measureflow.hookimpl\n"
        "def measureflow_register_fields(registry):\n"
        "    registry.add_field('linear', measureflow.Field)\n"
    )
    _fake_distribution(tmp_path, "clashplug", source)
    run = _plugins_command(tmp_path, strict=True)
    assert run.returncode != 0
    assert "measureflow_plugins.linear" in run.stderr and "clashplug" in run.stderr


# -- hooks whose name no spec declares -------------------------------------------------------------------

MISSPELLED = (
    "import measureflow\n"
    "@measureflow.hookimpl\n"
    "def measureflow_register_field(registry):\n"
    "    registry.add_field('{field}', measureflow.Field)\n"
    "@measureflow.hookimpl\n"
    "def measureflow_register_integrators(registry):\n"
    "    registry.add_integrator('{field}_integrator', object)\n"
)

HOOK_MESSAGE = (
    r"'measureflow_register_field' \(did you mean 'measureflow_register_fields'\?\) is not a measureflow hook"
    r".*the hooks are measureflow_register_fields, measureflow_register_integrators, measureflow_register_writers"
)


@pytest.fixture
def plugin_env(monkeypatch):
    """monkeypatch with strict mode off; afterwards the patches are undone and the registry rebuilt."""
    modules = set(sys.modules)
    monkeypatch.delenv("MEASUREFLOW_STRICT_PLUGINS", raising=False)
    yield monkeypatch
    monkeypatch.undo()
    for name in set(sys.modules) - modules:
        if name.startswith("typo"):  # the throwaway plugins below, so that no later test imports them
            del sys.modules[name]
    reload_registry()


def _plugin_module(path, name, field):
    """Import the misspelled plugin written to ``path`` as a module object (not through sys.path)."""
    import importlib.util

    source = path / f"{name}.py"
    source.write_text(MISSPELLED.format(field=field))
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_misspelled_hook_in_an_extra_plugin_is_named_and_skipped(tmp_path, plugin_env):
    module = _plugin_module(tmp_path, "typo_extra", "typo_extra_field")
    with pytest.warns(RuntimeWarning, match="'typo_extra' \\(extra plugin\\) failed to load and was skipped"):
        registry = reload_registry(extra_plugins=[module])
    ((label, message),) = registry.failures
    assert label == "typo_extra" and "plugin 'typo_extra'" in message
    assert re.search(HOOK_MESSAGE, message)
    # Skipped whole: its correctly spelled hook registered nothing either; the built-ins are all there.
    assert "typo_extra_field_integrator" not in registry.names("integrators")
    assert "typo_extra" not in registry.plugins and "linear" in registry.names("fields")


def test_misspelled_hook_in_an_extra_plugin_is_fatal_in_strict_mode(tmp_path, plugin_env):
    module = _plugin_module(tmp_path, "typo_strict", "typo_strict_field")
    plugin_env.setenv("MEASUREFLOW_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="plugin 'typo_strict' \\(extra plugin\\) failed to load") as info:
        reload_registry(extra_plugins=[module])
    assert re.search(HOOK_MESSAGE, str(info.value))


def test_misspelled_hook_in_an_installed_package_is_named_and_skipped(tmp_path, plugin_env):
    _fake_distribution(tmp_path, "typoplug", MISSPELLED.format(field="typoplug_field"))
    plugin_env.syspath_prepend(str(tmp_path))
    with pytest.warns(RuntimeWarning, match="'typoplug:typoplug' \\(typoplug_module\\) failed to load and was skipped"):
        registry = reload_registry()
    failures = dict(registry.failures)
    assert set(failures) == {"typoplug:typoplug"}
    assert re.search(HOOK_MESSAGE, failures["typoplug:typoplug"])
    assert "typoplug_field_integrator" not in registry.names("integrators")
    assert "spiral" in registry.names("fields")  # the other third-party plugin still loads

    plugin_env.setenv("MEASUREFLOW_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="'typoplug:typoplug' \\(typoplug_module\\) failed to load") as info:
        reload_registry()
    assert re.search(HOOK_MESSAGE, str(info.value))


def test_misspelled_hook_in_a_builtin_is_always_fatal(tmp_path, plugin_env):
    (tmp_path / "typo_builtin.py").write_text(MISSPELLED.format(field="typo_builtin_field"))
    plugin_env.syspath_prepend(str(tmp_path))
    plugin_env.setattr(measureflow.plugins, "BUILTIN_PLUGINS", (*measureflow.plugins.BUILTIN_PLUGINS, "typo_builtin"))
    with pytest.raises(PluginError, match=HOOK_MESSAGE):
        reload_registry()


def test_registrations_of_a_plugin_are_staged_together(plugin_env):
    """A hook that fails half-way leaves nothing of its plugin behind (and is named in the warning)."""
    module = types.ModuleType("half_way")

    @measureflow.hookimpl
    def measureflow_register_fields(registry):
        registry.add_field("half_way_first", measureflow.Field)
        registry.add_field("linear", measureflow.Field)  # clashes with the built-in

    module.measureflow_register_fields = measureflow_register_fields
    with pytest.warns(RuntimeWarning, match="'half_way'.*'measureflow_plugins.linear' and again by 'half_way'"):
        registry = reload_registry(extra_plugins=[module])
    assert "half_way_first" not in registry.names("fields")
    assert registry.owner_of("fields", "linear") == "measureflow_plugins.linear"
