"""The inline launcher (fashion_sweep/launcher.py) runs jobs as Hydra's basic launcher does.

The same small Hydra app and multirun, once per launcher: each job must see the same
config, the same HydraConfig (interpolations into the task's config included), the same
env_set, leave the same .hydra/ files, and a failing job must fail the same way.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

APP = """
import json, os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf


@hydra.main(config_path=".", config_name="app")
def main(cfg):
    hc = HydraConfig.get()
    seen = {
        "config": OmegaConf.to_container(cfg),
        "resolved": OmegaConf.to_container(cfg, resolve=True),
        "keys": sorted(cfg),
        "num": hc.job.num,
        "id": hc.job.id,
        "overrides": list(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        "tag": hc.job.env_set.APP_TAG,  # an interpolation into the task's config
        "env": os.environ.get("APP_TAG"),
        "readonly": OmegaConf.is_readonly(hc),
    }
    Path(hc.runtime.output_dir, "seen.json").write_text(json.dumps(seen))
    if cfg.x == 2:
        raise ValueError("x=2 is refused")
    return cfg.x * cfg.width


if __name__ == "__main__":
    main()
"""
CONFIG = """
x: 1
width: 7
name: w${width}-x${x}
hydra:
  job:
    env_set:
      APP_TAG: tag-${name}
"""


def run_app(tmp_path: Path, launcher: str) -> tuple[subprocess.CompletedProcess, Path]:
    sweep_dir = tmp_path / launcher
    result = subprocess.run(
        [sys.executable, "app.py", "-m", "x=1,2,3", "width=9",
         f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    return result, sweep_dir


def test_inline_jobs_match_the_basic_launchers(tmp_path):
    (tmp_path / "app.py").write_text(APP)
    (tmp_path / "app.yaml").write_text(CONFIG)
    basic, basic_dir = run_app(tmp_path, "basic")
    inline, inline_dir = run_app(tmp_path, "inline")

    # the failing job fails the sweep (Hydra's basic sweeper), the same way for both
    assert basic.returncode == inline.returncode != 0, inline.stderr
    assert "x=2 is refused" in basic.stderr and "x=2 is refused" in inline.stderr
    for job in ("0", "1", "2"):
        seen = json.loads((inline_dir / job / "seen.json").read_text())
        expected = json.loads((basic_dir / job / "seen.json").read_text())
        assert seen["output_dir"] == str(inline_dir / job)
        expected["output_dir"] = seen["output_dir"]
        assert seen == expected
        assert seen["tag"] == seen["env"] == f"tag-w9-x{int(job) + 1}"
        assert seen["keys"] == ["name", "width", "x"] and seen["readonly"]
        for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
            text = (inline_dir / job / ".hydra" / name).read_text()
            expected_text = (basic_dir / job / ".hydra" / name).read_text()
            assert same_but_launcher(text, inline_dir) == same_but_launcher(
                expected_text, basic_dir
            ), name
    # the failed job's traceback is in its log file, as Hydra writes it
    assert "x=2 is refused" in (inline_dir / "1" / "app.log").read_text()
    assert "x=2 is refused" in (basic_dir / "1" / "app.log").read_text()


def same_but_launcher(text: str, sweep_dir: Path) -> object:
    """A .hydra/ file's content, with what names the launcher and its sweep dir masked."""
    content = yaml.safe_load(text.replace(str(sweep_dir), "<sweep dir>"))
    if isinstance(content, dict) and "hydra" in content:
        hydra = content["hydra"]
        assert hydra["launcher"]["_target_"].endswith(("BasicLauncher", "InlineLauncher"))
        hydra["launcher"] = hydra["runtime"]["choices"]["hydra/launcher"] = "<launcher>"
        hydra["overrides"]["hydra"] = [
            o for o in hydra["overrides"]["hydra"] if not o.startswith("hydra/launcher=")
        ]
    return content
