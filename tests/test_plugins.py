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

    env = dict(os.environ, PYTHONPATH=str(path))
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
