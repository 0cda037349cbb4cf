"""The configs r4b ships live in the package (r4b/configs, linked from configs/ in the checkout): a wheel has them,
and ``--config configs/demo/sft.yaml`` finds them from any directory (scripts/check_wheel.sh runs the wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from r4b.config import ConfigError, load_config
from r4b.config.loading import SHIPPED_CONFIGS, shipped_config
from r4b.config.sections import BPOConfig, SFTConfig

ROOT = Path(__file__).resolve().parents[2]


def test_the_checkouts_configs_are_the_packages():
    assert (ROOT / "configs").resolve() == SHIPPED_CONFIGS == ROOT / "r4b" / "configs"
    assert {p.name for p in (SHIPPED_CONFIGS / "demo").iterdir()} == {"sft.yaml", "bpo.yaml"}


@pytest.mark.parametrize("name", ["configs/demo/sft.yaml", "demo/sft.yaml"])
def test_a_shipped_config_is_found_from_any_directory(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shipped_config(name) == SHIPPED_CONFIGS / "demo" / "sft.yaml"
    assert load_config(SFTConfig, name) == load_config(SFTConfig, ROOT / "configs" / "demo" / "sft.yaml")
    assert load_config(BPOConfig, "configs/gpu/bpo.yaml").rollout.group_size > 0


def test_a_local_file_comes_first_and_a_missing_one_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    (tmp_path / "configs" / "demo" / "sft.yaml").write_text("optim:\n  lr_llm: 0.5\n")
    assert load_config(SFTConfig, "configs/demo/sft.yaml").optim.lr_llm == 0.5
    with pytest.raises(ConfigError, match=r"^--config configs/demo/none\.yaml: no such file$"):
        load_config(SFTConfig, "configs/demo/none.yaml")
    assert shipped_config("configs") is None and shipped_config("configs/demo") is None
