"""Passes register by name; third-party passes arrive through the `edgeopt.passes` entry point."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from edgeopt.errors import InputError
from edgeopt.passes import PASSES, make_pass
from edgeopt.registry import Registry

PLUGIN = '''
from edgeopt.passes import Pass, PassConfig

class ScaleConfig(PassConfig):
    factor: float = 2.0

class ScalePass(Pass):
    name = "scale-weights"
    Config = ScaleConfig

    def run(self, artifact, ctx):
        return artifact
'''


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking distribution that declares an edgeopt.passes entry point."""
    (tmp_path / "edgeopt_scale_plugin.py").write_text(PLUGIN)
    info = tmp_path / "edgeopt_scale_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: edgeopt-scale-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent(
            """\
            [edgeopt.passes]
            scale-weights = edgeopt_scale_plugin:ScalePass
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtin_passes_registered():
    make_pass("lowrank", {})
    assert {"lowrank", "export"} <= set(PASSES.names())


def test_entry_point_pass_is_discovered(plugin_dist: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(PASSES, "_entry_points_loaded", False)
    monkeypatch.setattr(PASSES, "_items", dict(PASSES._items))
    the_pass = make_pass("scale-weights", {"factor": 3})
    assert type(the_pass).__module__ == "edgeopt_scale_plugin"
    assert the_pass.config.factor == 3
    assert "scale-weights" in PASSES.names()


def test_unknown_pass_suggests_closest():
    with pytest.raises(InputError, match="unknown pass 'lowrnak'; did you mean 'lowrank'"):
        make_pass("lowrnak", {})


def test_bad_pass_config_names_field():
    with pytest.raises(InputError, match="pass 'lowrank': rank_ratio"):
        make_pass("lowrank", {"rank_ratio": 2})
    with pytest.raises(InputError, match="pass 'lowrank': rank_ration"):
        make_pass("lowrank", {"rank_ration": 0.5})


def test_registry_rejects_duplicates():
    registry: Registry[int] = Registry("thing", "edgeopt.test-things")
    registry.add("a", 1)
    with pytest.raises(ValueError):
        registry.add("a", 2)
    assert registry.names() == ["a"]
