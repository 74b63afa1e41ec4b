"""The event loop choice (`[gateway] event_loop`, gatewayd/loop.py): uvloop where installed,
asyncio's own otherwise, and a clear config error when uvloop is demanded but missing."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import pytest

from gatewayd import cli
from gatewayd.loop import LoopUnavailableError, choose, loop_name

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop cannot be imported (as on a platform without its wheel)."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


def _run_on(factory: object) -> str:
    async def which() -> str:
        await asyncio.sleep(0)
        return loop_name(asyncio.get_running_loop())

    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        return runner.run(which())


def test_auto_takes_uvloop_when_it_imports() -> None:
    pytest.importorskip("uvloop", reason="uvloop has no wheel for this platform")
    name, factory = choose("auto")
    assert name == "uvloop"
    assert _run_on(factory) == "uvloop"


def test_auto_falls_back_to_asyncio_without_uvloop(no_uvloop: None) -> None:
    name, factory = choose("auto")
    assert name == "asyncio"
    assert _run_on(factory) == "asyncio"


def test_asyncio_is_asyncio_even_with_uvloop_installed() -> None:
    name, factory = choose("asyncio")
    assert (name, _run_on(factory)) == ("asyncio", "asyncio")


def test_uvloop_demanded_but_missing_is_a_config_error(no_uvloop: None) -> None:
    with pytest.raises(LoopUnavailableError, match=r"pip install uvloop"):
        choose("uvloop")
    with pytest.raises(LoopUnavailableError, match=r"expected one of auto, uvloop, asyncio"):
        choose("trio")


@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_explains_a_missing_uvloop(tmp_path: Path, no_uvloop: None, command: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    example = (ROOT / "config.example.toml").read_text()
    assert 'event_loop = "auto"' in example  # the key the example documents is the one read
    cfg = tmp_path / "gw.toml"
    cfg.write_text(textwrap.dedent(f"""
        [gateway]
        id = "gw-1"
        state_dir = "{tmp_path / 'state'}"
        event_loop = "uvloop"

        [[devices]]
        name = "boiler"
        driver = "sim"
        points.t = {{ shape = "sine" }}

        [uplinks.archive]
        type = "jsonl"
        path = "{tmp_path / 'out.jsonl'}"
    """))
    assert cli.main([command, "-c", str(cfg)]) == 78
    err = capsys.readouterr().err
    assert f"{cfg}: [gateway] event_loop = \"uvloop\", but uvloop cannot be imported" in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists()  # `run` stopped before touching anything
