"""The cached demo model is rebuilt when the adapters shipped in the package change (a new release), and a
demo built by hand is left alone. The merge and quantize steps are replaced by stand-ins that write a
config.json: what is tested is the decision to rebuild, not the build (tests/test_demo.py runs that)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lavin_edge.demo.paths as demo_paths
from lavin_edge.demo.build import demo_model_dir
from lavin_edge.demo.paths import ENV_VAR, DemoModelMissing


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    adapters = tmp_path / "shipped"
    adapters.mkdir()
    (adapters / "adapters.safetensors").write_bytes(b"weights v1")
    (adapters / "config.json").write_text("{}")
    monkeypatch.setattr(demo_paths, "ADAPTERS_DIR", adapters)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_VAR, raising=False)
    builds: list[str] = []

    def fake_merge(src: Path, out: Path, **_: object) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"weights": (Path(src) / "adapters.safetensors").read_text()}))
        builds.append("merge")

    def fake_quantize(src: Path, out: Path, *_: object, **__: object) -> None:
        out = Path(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text((Path(src) / "config.json").read_text())
        builds.append("quantize")

    monkeypatch.setattr("lavin_edge.merge.merge_dir", fake_merge)
    monkeypatch.setattr("lavin_edge.quantize.run.quantize_dir", fake_quantize)
    return {"adapters": adapters, "builds": builds, "cache": tmp_path / "home" / ".cache" / "lavin-edge" / "demo"}


def _built_from(d: Path) -> str:
    return json.loads((d / "config.json").read_text())["weights"]


def test_built_once_then_reused(fake: dict) -> None:
    d = demo_model_dir(build=True)
    assert d == fake["cache"] / "quantized" and _built_from(d) == "weights v1"
    assert demo_model_dir(build=True) == d
    assert fake["builds"] == ["merge", "quantize"]  # the second call found the stamp and built nothing


def test_new_shipped_adapters_rebuild_the_cache(fake: dict) -> None:
    demo_model_dir(build=True)
    (fake["adapters"] / "adapters.safetensors").write_bytes(b"weights v2")
    d = demo_model_dir(build=True)
    assert _built_from(d) == "weights v2"
    assert _built_from(fake["cache"] / "merged") == "weights v2"
    assert fake["builds"] == ["merge", "quantize"] * 2


def test_unstamped_cache_from_an_older_release_is_rebuilt(fake: dict) -> None:
    demo_model_dir(build=True)
    (fake["cache"] / demo_paths.STAMP_NAME).unlink()
    demo_model_dir(build=True)
    assert fake["builds"] == ["merge", "quantize"] * 2


def test_hand_built_demo_dir_is_used_as_is(fake: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "own"
    for name in ("merged", "quantized"):
        (own / name).mkdir(parents=True)
        (own / name / "config.json").write_text(json.dumps({"weights": "mine"}))
    monkeypatch.setenv(ENV_VAR, str(own))
    assert _built_from(demo_model_dir(build=True)) == "mine"
    assert fake["builds"] == []


def test_without_build_a_stale_cache_is_passed_over(fake: dict) -> None:
    """Read-only callers (bench, tests) never get a demo built from other adapters or by another lavin-edge (its
    format may no longer load): they are told to build it; only `chat` (build=True) rebuilds."""
    demo_model_dir(build=True)
    assert _built_from(demo_model_dir()) == "weights v1"
    (fake["adapters"] / "adapters.safetensors").write_bytes(b"weights v2")
    with pytest.raises(DemoModelMissing):
        demo_model_dir()
    assert fake["builds"] == ["merge", "quantize"]


def test_a_stale_cache_is_not_served_when_the_demo_dir_is_elsewhere(fake: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With $LAVIN_EDGE_DEMO_DIR set and empty, the demo is built there: the ~/.cache demo, built from older
    adapters, is neither served (it was, before this was fixed) nor touched."""
    demo_model_dir(build=True)
    (fake["adapters"] / "adapters.safetensors").write_bytes(b"weights v2")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    d = demo_model_dir(build=True)
    assert d == tmp_path / "elsewhere" / "quantized" and _built_from(d) == "weights v2"
    assert _built_from(fake["cache"] / "quantized") == "weights v1"
    assert fake["builds"] == ["merge", "quantize"] * 2


def test_an_empty_demo_dir_gets_the_demo_built_there(fake: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: with $LAVIN_EDGE_DEMO_DIR set and empty, chat (and its one-shot path, which asks
    ``built_demo_dir`` first) served the current ~/.cache demo instead of building one there."""
    from lavin_edge.demo.paths import built_demo_dir

    cached = demo_model_dir(build=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    assert built_demo_dir() is None  # the one-shot path must not find the cache's
    with pytest.raises(DemoModelMissing, match="elsewhere"):
        demo_model_dir()
    d = demo_model_dir(build=True)
    assert d == tmp_path / "elsewhere" / "quantized" and built_demo_dir() == d
    assert fake["builds"] == ["merge", "quantize"] * 2 and cached.is_dir()
